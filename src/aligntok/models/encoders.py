"""Pretrained vision foundation encoders (DINOv2, DINOv2 with registers, SigLIP2, MAE) through transformers.

:class:`FoundationEncoder` turns any of them into one interface: an image batch in [-1, 1] goes in, a grid
of patch tokens (B, C, h, w) comes out. It resizes the image so that the encoder's patch grid matches the
tokenizer's latent grid (a 256 px image and patch 14 give a 224 px input and a 16x16 grid), applies the
encoder's own pixel normalisation, and drops CLS and register tokens.

All loading goes through ``from_pretrained``, so a hub id, a directory written by transformers'
``save_pretrained`` and the local Hugging Face cache take the same path. :func:`build_encoder_from_config`
rebuilds the architecture with random weights from a saved transformers config (the tokenizer's own
weight file then fills them in, so loading a tokenizer needs no network).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PretrainedConfig,
    PreTrainedModel,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    ViTMAEConfig,
    ViTMAEModel,
)
from transformers.utils import cached_file

from aligntok.config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class _EncoderKind:
    """How one family of transformers models is loaded and read."""

    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    model_types: tuple[str, ...]  #: transformers ``model_type`` values that mean this kind
    default_mean: tuple[float, float, float]  #: used when the checkpoint has no preprocessor_config.json
    default_std: tuple[float, float, float]
    load_overrides: tuple[tuple[str, Any], ...] = ()  #: config changes applied on every load


ENCODER_KINDS: dict[str, _EncoderKind] = {
    "dinov2": _EncoderKind(Dinov2Config, Dinov2Model, ("dinov2",), IMAGENET_MEAN, IMAGENET_STD),
    "dinov2-with-registers": _EncoderKind(
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        ("dinov2_with_registers",),
        IMAGENET_MEAN,
        IMAGENET_STD,
    ),
    # Mask ratio 0 keeps every patch; the shuffle is undone by passing ascending noise in forward().
    "mae": _EncoderKind(ViTMAEConfig, ViTMAEModel, ("vit_mae",), IMAGENET_MEAN, IMAGENET_STD, (("mask_ratio", 0.0),)),
    # The attention-pooling head only feeds the pooled output, which a tokenizer never uses; dropping it
    # saves memory and leaves no parameter without a gradient (DDP rejects those).
    "siglip2": _EncoderKind(
        Siglip2VisionConfig,
        Siglip2VisionModel,
        ("siglip2", "siglip2_vision_model"),
        HALF_MEAN_STD,
        HALF_MEAN_STD,
        (("vision_use_head", False),),
    ),
}
ENCODER_KIND_CHOICES = ("auto", *ENCODER_KINDS)


class EncoderNotFoundError(ValueError):
    """A foundation encoder's files are neither local nor downloadable. The message is one line."""


@dataclasses.dataclass
class RandomEncoderConfig:
    """A tiny randomly initialised DINOv2 (tokenizer ``encoder: random``) for tests and the tiny config."""

    hidden_size: int = 64  #: token width
    num_layers: int = 2  #: transformer blocks
    num_heads: int = 2  #: attention heads (must divide hidden_size)
    patch_size: int = 4  #: pixels per patch side
    mlp_ratio: int = 4  #: MLP hidden width / hidden_size
    image_size: int = 64  #: side the position embeddings are laid out for (interpolated to other sizes)

    def validate(self) -> None:
        if min(self.hidden_size, self.num_layers, self.num_heads, self.patch_size, self.mlp_ratio) <= 0:
            raise ConfigError("hidden_size, num_layers, num_heads, patch_size and mlp_ratio must be positive")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.image_size < self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is smaller than patch_size={self.patch_size}")


class FoundationEncoder(nn.Module):
    """A transformers vision encoder that maps images in [-1, 1] to patch-token grids (B, C, h, w).

    Attributes: ``model`` (the transformers model), ``kind``, ``hidden_size``, ``patch_size``, ``stride``
    (image pixels per latent cell, which sets the default grid) and ``hf_config``. The pixel mean/std are
    persistent buffers, so they travel with the tokenizer's weights.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        kind: str,
        *,
        stride: int = 16,
        image_mean: tuple[float, ...] | None = None,
        image_std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        if kind not in ENCODER_KINDS:
            raise ValueError(f"unknown encoder kind {kind!r}; expected one of {', '.join(ENCODER_KINDS)}")
        if stride <= 0:
            raise ValueError(f"stride must be positive, got {stride}")
        spec = ENCODER_KINDS[kind]
        self.model = model
        self.kind = kind
        self.stride = stride
        self.hidden_size: int = model.config.hidden_size
        self.patch_size: int = model.config.patch_size
        # The mask token only serves masked pretraining; left in, it is a parameter without gradient.
        embeddings = getattr(model, "embeddings", None)
        if isinstance(getattr(embeddings, "mask_token", None), nn.Parameter):
            embeddings.mask_token = None
        # Tokens before the patch tokens: CLS (none in SigLIP2) and registers.
        has_cls = kind != "siglip2"
        self._num_prefix_tokens = int(has_cls) + getattr(model.config, "num_register_tokens", 0)
        mean = torch.tensor(image_mean or spec.default_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(image_std or spec.default_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean)
        self.register_buffer("pixel_std", std)

    @property
    def hf_config(self) -> PretrainedConfig:
        return self.model.config

    def default_grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.stride, width // self.stride

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Patch tokens (B, hidden_size, h, w) of images ``x`` (B, 3, H, W) in [-1, 1].

        The image is resized (bilinear, antialiased) to the grid times the patch size and normalised
        with the encoder's pixel mean/std, as its pretraining saw images.
        """
        h, w = self._grid(x, grid)
        size = (h * self.patch_size, w * self.patch_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = ((x + 1) / 2 - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)
        return self.encode_pixels(x, (h, w))

    def encode_pixels(self, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens (B, hidden_size, h, w) of model inputs already prepared and sized ``grid * patch_size``."""
        h, w = self._grid(pixel_values, grid)
        if tuple(pixel_values.shape[-2:]) != (h * self.patch_size, w * self.patch_size):
            raise ValueError(
                f"pixel values of size {tuple(pixel_values.shape[-2:])} do not make a {h}x{w} grid of "
                f"{self.patch_size} px patches"
            )
        tokens = self._tokens(pixel_values, h, w)[:, self._num_prefix_tokens :]
        return tokens.reshape(pixel_values.shape[0], h, w, self.hidden_size).permute(0, 3, 1, 2)

    def _grid(self, x: torch.Tensor, grid: tuple[int, int] | None) -> tuple[int, int]:
        h, w = grid if grid is not None else self.default_grid(x.shape[-2], x.shape[-1])
        if h <= 0 or w <= 0:
            raise ValueError(f"latent grid {h}x{w} is empty for a {x.shape[-2]}x{x.shape[-1]} image")
        return h, w

    def _tokens(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        batch = x.shape[0]
        if self.kind == "siglip2":
            # NaFlex input: flattened patches (row, column, channel order inside a patch), a mask and the grid.
            p = self.patch_size
            patches = x.reshape(batch, 3, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(batch, h * w, p * p * 3)
            mask = torch.ones(batch, h * w, dtype=torch.long, device=x.device)
            shapes = torch.tensor([[h, w]], dtype=torch.long, device=x.device).expand(batch, 2)
            return self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state
        if self.kind == "mae":
            # Ascending noise makes MAE's argsort "shuffle" the identity: patches stay in raster order.
            order = torch.arange(h * w, device=x.device, dtype=torch.float32).expand(batch, h * w)
            return self.model(pixel_values=x, noise=order, interpolate_pos_encoding=True).last_hidden_state
        return self.model(pixel_values=x).last_hidden_state


def _resolve_kind(kind: str, model_type: str, name: str) -> str:
    if kind != "auto":
        if kind not in ENCODER_KINDS:
            raise ValueError(f"encoder kind {kind!r} is not one of {', '.join(ENCODER_KIND_CHOICES)}")
        if model_type not in ENCODER_KINDS[kind].model_types:
            raise ValueError(f"encoder '{name}' has model_type '{model_type}', which is not a {kind} encoder")
        return kind
    for candidate, spec in ENCODER_KINDS.items():
        if model_type in spec.model_types:
            return candidate
    raise ValueError(
        f"encoder '{name}' has model_type '{model_type}'; supported: "
        + ", ".join(t for spec in ENCODER_KINDS.values() for t in spec.model_types)
    )


def _not_found(name: str) -> EncoderNotFoundError:
    return EncoderNotFoundError(
        f"foundation encoder '{name}' is not on this machine and could not be downloaded: on a machine with "
        f"internet run `hf download {name}` and copy the Hugging Face cache (~/.cache/huggingface, or $HF_HOME) "
        f"here, or set model.encoder to a local directory holding its config.json and weights"
    )


def looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a directory.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _preprocessor_stats(name: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """image_mean / image_std from the checkpoint's preprocessor_config.json, if it has one."""
    try:
        path = cached_file(
            name,
            "preprocessor_config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except OSError:
        path = None
    if path is None:
        return None, None
    data = json.loads(Path(path).read_text())
    mean, std = data.get("image_mean"), data.get("image_std")
    return (tuple(mean) if mean else None), (tuple(std) if std else None)


def load_encoder(name_or_dir: str, *, kind: str = "auto", stride: int = 16) -> FoundationEncoder:
    """Load a pretrained foundation encoder from a hub id, a local directory or the local HF cache.

    Config-level specs such as ``standin:NAME`` are resolved to a directory before this is called
    (:func:`aligntok.models.tokenizer.build_foundation_encoder`), so this module depends on no stand-in.
    """
    name = str(name_or_dir)
    local = Path(name).expanduser()
    if local.is_dir():
        name = str(local)
    elif looks_like_local_path(name):
        raise EncoderNotFoundError(f"encoder directory '{name}' does not exist")
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError:
        raise _not_found(name) from None
    kind = _resolve_kind(kind, config.model_type, name)
    spec = ENCODER_KINDS[kind]
    # A full SigLIP2 checkpoint (text + vision) is read through its vision tower's config.
    config = getattr(config, "vision_config", None) or config
    for key, value in spec.load_overrides:
        setattr(config, key, value)
    # transformers logs a long table of the checkpoint's unused weights (a SigLIP2 text tower, MAE's
    # decoder), which are expected here; missing weights are checked below instead. With that logger quiet,
    # transformers 5.x runs its tensor-parallel plan check (`logger.level >= WARNING`), which then lists every
    # layer of a model without a plan as "not sharded": quiet too.
    report_loggers = [logging.getLogger(f"transformers.{n}") for n in ("modeling_utils", "distributed.tensor_parallel")]
    levels = [logger.level for logger in report_loggers]
    for logger in report_loggers:
        logger.setLevel(logging.ERROR)
    try:
        model, info = spec.model_class.from_pretrained(
            name, config=config, dtype=torch.float32, output_loading_info=True
        )
    except OSError:
        raise _not_found(name) from None
    except RuntimeError as e:  # e.g. weights of the wrong shape
        raise ValueError(
            f"encoder '{name}' does not load as a {spec.model_class.__name__}: {str(e).splitlines()[0]}"
        ) from None
    finally:
        for logger, level in zip(report_loggers, levels, strict=True):
            logger.setLevel(level)
    missing = sorted(k for k in info["missing_keys"] if "mask_token" not in k)  # the mask token is dropped anyway
    if missing:
        raise ValueError(
            f"encoder '{name}' lacks {len(missing)} weights of a {spec.model_class.__name__} (first: {missing[0]})"
        )
    mean, std = _preprocessor_stats(name)
    return FoundationEncoder(model, kind, stride=stride, image_mean=mean, image_std=std)


def build_encoder_from_config(kind: str, hf_config_dict: dict, *, stride: int = 16) -> FoundationEncoder:
    """The architecture of a saved encoder with random weights (filled in later from a weight file)."""
    if kind not in ENCODER_KINDS:
        raise ValueError(f"unknown encoder kind {kind!r}; expected one of {', '.join(ENCODER_KINDS)}")
    spec = ENCODER_KINDS[kind]
    config = spec.config_class.from_dict(dict(hf_config_dict))
    for key, value in spec.load_overrides:
        setattr(config, key, value)
    return FoundationEncoder(spec.model_class(config), kind, stride=stride)


def build_random_encoder(cfg: RandomEncoderConfig, *, stride: int = 16) -> FoundationEncoder:
    """A tiny DINOv2 with random weights, for tests and the tiny config."""
    config = Dinov2Config(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        patch_size=cfg.patch_size,
        mlp_ratio=cfg.mlp_ratio,
        image_size=cfg.image_size,
    )
    return FoundationEncoder(Dinov2Model(config), "dinov2", stride=stride)
