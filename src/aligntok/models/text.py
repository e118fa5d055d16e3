"""Frozen text encoders for text-to-image: a T5 encoder for the token sequence, and the pooled vector.

As FLUX: T5's ``last_hidden_state`` conditions the joint attention and CLIP's text ``pooler_output``
(the final-layer-normed EOS token, not projected) feeds the timestep/pooled embedding. When no CLIP is
configured the pooled vector is the masked mean of the T5 states (``pooled: mean``) or zeros.

Models are loaded by hub id, local directory or from the offline Hugging Face cache, always through the
concrete classes ``T5EncoderModel`` / ``CLIPTextModel``: ``AutoModel`` on a T5 checkpoint silently builds
a full ``T5Model`` with a randomly initialised decoder. The directory's ``model_type`` is checked first, so
a wrong directory is a one-line error. ``standin:NAME`` names an offline stand-in trained on the built-in
captions (:mod:`aligntok.standins.text`).

Captions are padded to the batch's longest (not a fixed length: cheaper, and the mask hides the padding)
and truncated at ``max_length``; truncations are counted in :attr:`TextConditioner.truncated`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from aligntok.config import ConfigError
from aligntok.models.word_tokenizer import word_level_tokenizer

POOLED_SOURCES = ("mean", "zeros")  # anything else names a CLIP text model
_SEQUENCE_TYPES = ("t5", "mt5", "umt5")
_CLIP_TYPES = ("clip", "clip_text_model")


@dataclasses.dataclass
class TextConfig:
    """Which text encoders condition the T2I model, and how captions are cut."""

    encoder: str = "standin:t5-shapes"  #: T5 encoder: hub id (google/t5-v1_1-xxl), directory, or standin:NAME
    max_length: int = 32  #: T5 tokens kept per caption (FLUX: 512; 128 is plenty for LAION at 256 px)
    pooled: str = "mean"  #: pooled vector: mean (masked mean of T5) | zeros | a CLIP text model (hub id, dir)
    pooled_max_length: int = 77  #: CLIP tokens kept per caption (CLIP's own limit)

    def validate(self) -> None:
        if not self.encoder:
            raise ConfigError("text.encoder must name a T5 encoder (hub id, directory or standin:NAME)")
        if self.max_length < 2 or self.pooled_max_length < 2:
            raise ConfigError("max_length and pooled_max_length must be >= 2 (EOS needs a place)")


def _model_type(name: str) -> str:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name).model_type
    except OSError as e:
        raise ValueError(f"text encoder {name!r}: not a local model directory, nor a hub id found online or in "
                         f"the offline cache ({str(e).splitlines()[0]})") from None


def _load(name: str, expected: Sequence[str], role: str):
    """(tokenizer, model) of ``name`` through the concrete class of its ``role``; frozen, eval."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    model_type = _model_type(name)
    if model_type not in expected:
        raise ValueError(f"{role} {name!r} is a {model_type!r} model; expected one of {', '.join(expected)}")
    cls = T5EncoderModel if expected is _SEQUENCE_TYPES else CLIPTextModel
    model = cls.from_pretrained(name)
    return AutoTokenizer.from_pretrained(name), model.requires_grad_(False).eval()


def resolve_text_encoder(spec: str, *, progress: bool = True) -> str:
    """``standin:NAME`` -> the cached stand-in's directory (trained on first use); any other spec unchanged."""
    if spec.startswith("standin:"):
        from aligntok.standins.text import ensure_standin_text_encoder

        return str(ensure_standin_text_encoder(spec[len("standin:"):], progress=progress))
    return spec


class TextConditioner(nn.Module):
    """Frozen text encoders: captions -> ``(tokens (B, L, text_dim), mask (B, L) bool, pooled (B, pooled_dim))``.

    Not an engine module: it is never trained nor checkpointed; its source is recorded in the model dir.
    """

    def __init__(self, config: TextConfig | None = None, *, progress: bool = True, models: tuple | None = None) -> None:
        """``models``: already loaded ``(tokenizer, encoder, clip_tokenizer, clip)`` (e.g. a diffusers
        pipeline's components; the CLIP pair None unless ``config.pooled`` names one) instead of loading
        ``config.encoder`` / ``config.pooled``."""
        super().__init__()
        config = config or TextConfig()
        config.validate()
        self.config = config
        if models is not None:
            self.tokenizer, self.encoder, self.clip_tokenizer, self.clip = models
            self.encoder_path = str(getattr(self.encoder, "name_or_path", config.encoder))
            if (self.clip is None) != (config.pooled in POOLED_SOURCES):
                raise ValueError(f"text.pooled={config.pooled!r} needs a CLIP text model exactly when it names one")
        else:
            self.encoder_path = resolve_text_encoder(config.encoder, progress=progress)
            self.tokenizer, self.encoder = _load(self.encoder_path, _SEQUENCE_TYPES, "text.encoder")
            self.clip_tokenizer = self.clip = None
            if config.pooled not in POOLED_SOURCES:
                self.clip_tokenizer, self.clip = _load(resolve_text_encoder(config.pooled, progress=progress),
                                                       _CLIP_TYPES, "text.pooled")
        self.truncated = 0  #: captions cut at max_length so far (T5 or CLIP)

    @property
    def text_dim(self) -> int:
        return self.encoder.config.d_model

    @property
    def pooled_dim(self) -> int:
        return self.clip.config.hidden_size if self.clip is not None else self.text_dim

    def train(self, mode: bool = True) -> TextConditioner:
        return super().train(False)  # frozen: always eval (no dropout)

    def _tokenize(self, tokenizer, captions: list[str], max_length: int) -> dict[str, torch.Tensor]:
        full = tokenizer(captions, padding="longest", return_tensors="pt")["attention_mask"].sum(1)
        self.truncated += int((full > max_length).sum())
        batch = tokenizer(captions, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        device = next(self.encoder.parameters()).device
        return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        captions = [str(c) for c in captions]
        batch = self._tokenize(self.tokenizer, captions, self.config.max_length)
        tokens = self.encoder(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].bool()
        if self.clip is not None:
            clip_batch = self._tokenize(self.clip_tokenizer, captions, self.config.pooled_max_length)
            pooled = self.clip(**clip_batch).pooler_output.float()
        elif self.config.pooled == "mean":
            weights = mask.float()[..., None]
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        else:
            pooled = tokens.new_zeros(tokens.shape[0], self.text_dim)
        return tokens, mask, pooled

    def describe(self) -> dict[str, object]:
        """What a model directory records about its text conditioning."""
        return {**dataclasses.asdict(self.config), "encoder_path": self.encoder_path,
                "text_dim": self.text_dim, "pooled_dim": self.pooled_dim}


def build_tiny_text_encoders(directory: str | os.PathLike, words: Iterable[str], *, width: int = 32,
                             layers: int = 2, heads: int = 4, seed: int = 0, clip: bool = True) -> dict[str, Path]:
    """Write a random tiny T5 encoder (``DIR/t5``) and CLIP text model (``DIR/clip``), each with a word-level
    tokenizer over ``words``, loadable like hub models. For tests and as the stand-in's starting point."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    directory = Path(directory)
    tokenizer = word_level_tokenizer(words)
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=width, d_kv=width // heads, d_ff=2 * width,
                                 num_layers=layers, num_heads=heads, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0, dropout_rate=0.0))
    paths = {"t5": directory / "t5"}
    t5.save_pretrained(paths["t5"])
    tokenizer.save_pretrained(paths["t5"])
    if clip:
        clip_model = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                                  num_hidden_layers=layers, num_attention_heads=heads,
                                                  max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                                                  eos_token_id=1))
        paths["clip"] = directory / "clip"
        clip_model.save_pretrained(paths["clip"])
        tokenizer.save_pretrained(paths["clip"])
    return paths
