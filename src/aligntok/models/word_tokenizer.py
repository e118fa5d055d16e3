"""A word-level tokenizer with T5's special ids, for tiny text encoders (tests) and the offline stand-in.

Its own module so that the stand-in (:mod:`aligntok.standins.text`) and the text-encoder loader
(:mod:`aligntok.models.text`, which resolves ``standin:NAME``) do not import each other.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as T5's


def word_level_tokenizer(words: Iterable[str], model_max_length: int = 512):
    """A fast word-level tokenizer (lower-cased, split on spaces and punctuation, ``</s>`` appended) over
    ``words`` with T5's special ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2. For tiny models and stand-ins."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for word in sorted(set(words)):
        vocab.setdefault(word.lower(), len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def caption_words(captions: Iterable[str]) -> set[str]:
    """The words :func:`word_level_tokenizer` would see in ``captions``."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    return {piece.lower() for caption in captions for piece, _ in split.pre_tokenize_str(caption)}
