"""The offline stand-in text encoder, ``standin:t5-shapes``: a small T5 encoder trained on built-in captions.

No T5 can be downloaded here, yet text-to-image needs a text encoder whose states tell captions apart and
keep word order. The stand-in is a real ``T5EncoderModel`` (d_model 64, 2 layers, relative position bias)
with a word-level tokenizer over the built-in captions' vocabulary (``builtin:shapes`` and
``builtin:scenes``, plain and mirrored), saved with ``save_pretrained``, so it loads through exactly the
path ``google/t5-v1_1-xxl`` takes (:class:`aligntok.models.text.TextConditioner`).

Recipe (~40 s on 2 idle CPU cores): each token's state predicts its own word and both neighbours (so states
are contextual: "red circle left of a blue square" differs from "blue circle left of a red square" token
by token), and the masked mean predicts the caption's bag of words (so the pooled vector summarises it).
Cached like the other stand-ins (:mod:`aligntok.standins.cache`: recipe hash, lock, atomic rename).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aligntok.config import ConfigError, OptimConfig
from aligntok.standins.cache import ensure_cached, select_preset
from aligntok.standins.recipe import RecipeSettings

KIND = "text"


@dataclasses.dataclass
class StandinTextSettings(RecipeSettings):
    """Architecture and recipe of the stand-in T5 (``resolution`` is unused: captions only)."""

    d_model: int = 64  #: T5 width
    num_layers: int = 2  #: encoder blocks
    num_heads: int = 4  #: attention heads
    steps: int = 200  #: optimizer steps
    batch_size: int = 64  #: captions per step
    data_size: int = 1000  #: captions per built-in dataset (shapes and scenes), plus their mirrored forms

    def validate(self) -> None:
        super().validate()
        if min(self.d_model, self.num_layers, self.num_heads) <= 0 or self.d_model % self.num_heads:
            raise ConfigError("d_model, num_layers, num_heads must be positive and num_heads must divide d_model")


STANDIN_TEXT_ENCODERS: dict[str, StandinTextSettings] = {"t5-shapes": StandinTextSettings()}


def builtin_captions(size: int, seed: int = 0) -> list[str]:
    """The first ``size`` captions of builtin:shapes and of builtin:scenes, each also mirrored."""
    from aligntok.data.builtin import make_scene, swap_left_right
    from aligntok.data.scenes import make_scene_graph

    captions = [make_scene(seed, i).caption for i in range(size)]
    captions += [make_scene_graph(seed, i).caption for i in range(size)]
    return captions + [swap_left_right(c) for c in captions]


def _train(settings: StandinTextSettings, staging: Path) -> dict[str, Any]:
    from transformers import T5Config, T5EncoderModel

    from aligntok.models.word_tokenizer import caption_words, word_level_tokenizer
    from aligntok.training.optim import lr_factor

    started = time.perf_counter()
    captions = builtin_captions(settings.data_size, settings.data_seed)
    tokenizer = word_level_tokenizer(caption_words(captions))
    vocab = len(tokenizer)
    encoded = tokenizer(captions, padding="longest", return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"].bool()
    torch.manual_seed(settings.init_seed)
    model = T5EncoderModel(T5Config(vocab_size=vocab, d_model=settings.d_model, d_kv=settings.d_model // settings.num_heads,
                                    d_ff=2 * settings.d_model, num_layers=settings.num_layers, num_heads=settings.num_heads,
                                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0))
    heads = nn.Linear(settings.d_model, 4 * vocab)  # previous, own, next word; bag of words (pooled)
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    optim_cfg = OptimConfig(lr=settings.lr, warmup_steps=settings.warmup_steps, schedule=settings.schedule)
    generator = torch.Generator().manual_seed(settings.init_seed)
    losses = []
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(step, optim_cfg, settings.steps)
        pick = torch.randint(len(captions), (settings.batch_size,), generator=generator)
        x, m = ids[pick], mask[pick]
        states = model(input_ids=x, attention_mask=m.long()).last_hidden_state
        logits = heads(states).view(*x.shape, 4, vocab)
        previous = F.pad(x, (1, 0))[:, :-1]
        following = F.pad(x, (0, 1))[:, 1:]
        token_loss = sum(F.cross_entropy(logits[..., k, :][m], target[m])
                         for k, target in enumerate((previous, x, following)))
        weights = m.float()[..., None]
        pooled = (states * weights).sum(1) / weights.sum(1)
        bag = torch.zeros(len(x), vocab).scatter_(1, x, 1.0)
        bag_loss = F.binary_cross_entropy_with_logits(heads(pooled).view(-1, 4, vocab)[:, 3], bag)
        loss = token_loss / 3 + bag_loss * 10
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        states = model(input_ids=ids[:512], attention_mask=mask[:512].long()).last_hidden_state
        own = heads(states).view(*ids[:512].shape, 4, vocab)[..., 1, :].argmax(-1)
        accuracy = float((own == ids[:512])[mask[:512]].float().mean())
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    return {"seconds": round(time.perf_counter() - started, 1), "vocab_size": vocab, "first_loss": losses[0],
            "final_loss": sum(losses[-20:]) / len(losses[-20:]), "own_word_accuracy": accuracy}


def ensure_standin_text_encoder(settings: StandinTextSettings | str | None = None, *, progress: bool = True) -> Path:
    """Directory of the stand-in T5 (a :data:`STANDIN_TEXT_ENCODERS` name, default ``t5-shapes``), trained
    on first use (seconds) and cached; load it with ``TextConfig(encoder=str(path))`` or ``standin:t5-shapes``."""
    settings = select_preset(STANDIN_TEXT_ENCODERS, "stand-in text encoder", settings, "t5-shapes")
    return ensure_cached(KIND, settings, lambda staging: _train(settings, staging), progress=progress)
