"""The AlignTok tokenizer: foundation encoder -> adapter -> latent -> CNN decoder.

``AlignTokTokenizer`` is what every stage trains and what users load::

    tok = AlignTokTokenizer.from_pretrained("path/or/hub-id")
    z = tok.encode(x)          # x (B, 3, H, W) in [-1, 1]  ->  z (B, C, H/16, W/16)
    x_hat = tok.decode(z)

A saved tokenizer is a directory with config.json (this tokenizer's config and the encoder's
transformers config, so loading needs no network), model.safetensors (every weight, the fine-tuned
encoder included) and a README.md model card. Latent normalisation statistics live in the config.

What every tokenizer shares (the CNN decoder, input checks, latent statistics, save/load, the model
card) lives in :class:`LatentTokenizer`; the baselines of :mod:`aligntok.models.baselines` (a plain
VAE and a VA-VAE-style VAE) subclass it too. ``config.json`` names the tokenizer's ``method``, and
``from_pretrained`` on any of these classes loads whichever tokenizer a directory holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from aligntok.config import ConfigError, check_choice, config_from_dict, config_to_dict
from aligntok.hub import model_card, resolve_directory
from aligntok.io import reading, write_directory_atomically
from aligntok.models.adapter import Adapter
from aligntok.models.decoder import DecoderConfig, LatentDecoder
from aligntok.models.encoders import (
    ENCODER_KIND_CHOICES,
    FoundationEncoder,
    RandomEncoderConfig,
    build_encoder_from_config,
    build_random_encoder,
    load_encoder,
    looks_like_local_path,
)
from aligntok.models.tiling import tiled_map

RANDOM_ENCODER = "random"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT_NAME = "aligntok-tokenizer"
ALIGNTOK_METHOD = "aligntok"  #: ``method`` of an AlignTok tokenizer in config.json (and of files saved before the key)
MAX_ABS_INPUT = 1.5  # inputs beyond this are surely not scaled to [-1, 1]


class TokenizerNotFoundError(ValueError):
    """A saved tokenizer is neither local nor downloadable. The message is one line."""


@dataclasses.dataclass
class TokenizerConfig:
    """Architecture of an AlignTok tokenizer (paper default: DINOv2-L/14, f16d32)."""

    #: hub id or local directory of a transformers encoder, 'standin:NAME' (aligntok.standins) or 'random'
    encoder: str = "facebook/dinov2-large"
    encoder_kind: str = (
        "auto"  #: auto (from the checkpoint's model_type) | dinov2 | dinov2-with-registers | mae | siglip2
    )
    random_encoder: RandomEncoderConfig = dataclasses.field(
        default_factory=RandomEncoderConfig
    )  #: used when encoder='random'
    latent_channels: int = 32  #: latent channels: 32 (f16d32, the paper's default) or 64 (f16d64)
    adapter_hidden: int = 1024  #: hidden width of the two-layer adapter MLP (inferred; not given in the paper)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)  #: CNN decoder; sets the stride
    latent_mean: list[float] | None = None  #: per-channel latent mean over the training set (set by cache-latents)
    latent_std: list[float] | None = None  #: per-channel latent std over the training set (set by cache-latents)

    def validate(self) -> None:
        self.random_encoder.validate()
        self.decoder.validate()
        check_choice("encoder_kind", self.encoder_kind, ENCODER_KIND_CHOICES)
        if not self.encoder.strip():
            raise ConfigError("encoder must name a hub id, a local directory or 'random'")
        if self.encoder == RANDOM_ENCODER and self.encoder_kind not in ("auto", "dinov2"):
            raise ConfigError(f"encoder='random' is a DINOv2; encoder_kind={self.encoder_kind!r} does not fit")
        if self.latent_channels <= 0 or self.adapter_hidden <= 0:
            raise ConfigError("latent_channels and adapter_hidden must be positive")
        validate_latent_stats(self.latent_mean, self.latent_std, self.latent_channels)


def validate_latent_stats(mean: list[float] | None, std: list[float] | None, latent_channels: int) -> None:
    """One-line ConfigError unless the per-channel latent statistics are unset or complete and sane."""
    if (mean is None) != (std is None):
        raise ConfigError("latent_mean and latent_std must be set together")
    if mean is None or std is None:
        return
    if len(mean) != latent_channels or len(std) != latent_channels:
        raise ConfigError(
            f"latent_mean/latent_std have {len(mean)}/{len(std)} entries, expected latent_channels={latent_channels}"
        )
    if not all(math.isfinite(s) and s > 0 for s in std):
        raise ConfigError("latent_std entries must be finite and positive")
    if not all(math.isfinite(m) for m in mean):
        raise ConfigError("latent_mean entries must be finite")


def build_foundation_encoder(config: TokenizerConfig) -> FoundationEncoder:
    """The encoder ``config.encoder`` names (pretrained, or a random DINOv2), laid out for the decoder's stride.

    AlignTok starts from it; the VA-VAE baseline aligns its latent to it (frozen).
    """
    config.validate()
    stride = config.decoder.stride
    if config.encoder == RANDOM_ENCODER:
        return build_random_encoder(config.random_encoder, stride=stride)
    name = config.encoder
    if name.startswith("standin:"):
        # An offline stand-in DINOv2 directory (shipped, or trained once and cached).
        from aligntok.standins.encoder import resolve_encoder_spec

        name = resolve_encoder_spec(name)
    return load_encoder(name, kind=config.encoder_kind, stride=stride)


class LatentTokenizer(nn.Module):
    """What every aligntok tokenizer shares: the CNN decoder, input checks, latent statistics, save/load.

    A subclass sets :attr:`method` (written to config.json) and :attr:`parts` (its trainable parts, which
    the training stages freeze or train), builds its encoder side and the ``decoder`` in ``__init__``, and
    implements :meth:`encode`, :meth:`_from_document` and :meth:`_card_summary`. Its config is a dataclass
    with ``latent_channels``, ``decoder`` (a :class:`DecoderConfig`), ``latent_mean`` and ``latent_std``.
    """

    method: ClassVar[str]  #: written to config.json; selects the class that loads the directory
    parts: ClassVar[tuple[str, ...]]  #: names of the submodules a training stage trains or freezes
    decoder: LatentDecoder

    def __init__(self, config: Any) -> None:
        super().__init__()
        config.validate()
        self.config = config

    # ------------------------------------------------------------------------------------------ building

    @property
    def stride(self) -> int:
        return self.decoder.stride

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def decoder_last_layer(self) -> nn.Parameter:
        """The decoder's output layer weight, where the adaptive GAN weight compares gradient norms."""
        return self.decoder.last_layer

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in self.parts}

    # ----------------------------------------------------------------------------------- encode / decode

    def check_images(self, x: torch.Tensor) -> None:
        """Raise a one-line ValueError unless ``x`` is a float batch (B, 3, H, W) in [-1, 1] fitting the stride."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {_describe(x)}")
        if x.shape[1] != 3:
            raise ValueError(f"expected 3 channels (RGB) in dim 1, got {x.shape[1]} (shape {tuple(x.shape)})")
        if x.shape[-2] % self.stride or x.shape[-1] % self.stride or x.shape[-2] == 0 or x.shape[-1] == 0:
            raise ValueError(
                f"image size {x.shape[-2]}x{x.shape[-1]} is not a positive multiple of the stride {self.stride}"
            )
        if not x.is_floating_point():
            raise ValueError(f"expected a float tensor scaled to [-1, 1], got dtype {x.dtype}")
        low, high = torch.stack(torch.aminmax(x.detach())).float().tolist()  # one device sync
        if not (math.isfinite(low) and math.isfinite(high)) or low < -MAX_ABS_INPUT or high > MAX_ABS_INPUT:
            raise ValueError(f"image values span [{low:.3g}, {high:.3g}]; scale images to [-1, 1] (e.g. x / 127.5 - 1)")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent_channels, H / stride, W / stride) of images in [-1, 1]; deterministic."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, h * stride, w * stride), nominally in [-1, 1] (not clamped), from latents.
        In tiles when :meth:`enable_tiling` is on and the latent is larger than one tile."""
        return self.tiled_decode(self.decoder, z)

    # ------------------------------------------------------------------------------------------ tiling

    #: (tile, overlap) in latent positions while tiling is on (see :meth:`enable_tiling`), else None.
    tiling: tuple[int, int] | None = None

    def enable_tiling(self, tile_latent_size: int = 32, tile_overlap: int = 8) -> None:
        """Encode and decode large images in overlapping tiles of ``tile_latent_size`` latent positions
        (32 = 512 px at stride 16), blended over ``tile_overlap`` positions (:mod:`aligntok.models.tiling`),
        so that activation memory grows with the tile, not the image. Inputs of one tile or less are
        unchanged; larger ones are approximated where the networks look beyond the overlap (attention,
        GroupNorm statistics), as with diffusers' ``enable_tiling``. Raises ValueError for bad sizes."""
        if tile_latent_size <= 0 or not 0 <= tile_overlap < tile_latent_size:
            raise ValueError(f"need tile_latent_size > tile_overlap >= 0, got {tile_latent_size} and {tile_overlap}")
        self.tiling = (tile_latent_size, tile_overlap)

    def disable_tiling(self) -> None:
        """Encode and decode whole images again (the default)."""
        self.tiling = None

    def tiled_encode(self, encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``encode(x)`` (a subclass's untiled encoder) on tiles when tiling is on; for subclasses' :meth:`encode`."""
        if self.tiling is None:
            return encode(x)
        tile, overlap = self.tiling
        return tiled_map(encode, x, tile=tile, overlap=overlap, in_per_unit=self.stride, out_per_unit=1)

    def tiled_decode(self, decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """``decode(z)`` (an untiled decoder) on tiles when tiling is on; for :meth:`decode` overrides."""
        if self.tiling is None:
            return decode(z)
        tile, overlap = self.tiling
        return tiled_map(decode, z, tile=tile, overlap=overlap, in_per_unit=1, out_per_unit=self.stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    # ---------------------------------------------------------------------------- latent normalisation

    def set_latent_stats(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> None:
        """Store per-channel latent statistics (saved with the tokenizer's config)."""
        mean_list = [float(v) for v in torch.as_tensor(mean).flatten()]
        std_list = [float(v) for v in torch.as_tensor(std).flatten()]
        candidate = dataclasses.replace(self.config, latent_mean=mean_list, latent_std=std_list)
        candidate.validate()
        self.config = candidate

    def _latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.latent_mean is None or self.config.latent_std is None:
            raise ValueError(
                "latent statistics are not set: compute them over the training set (aligntok cache-latents), "
                "or call set_latent_stats(mean, std)"
            )
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.config.latent_mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(self.config.latent_std, dtype=z.dtype, device=z.device).view(shape)
        return mean, std

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(z)
        return z * std + mean

    # -------------------------------------------------------------------------------------- save / load

    def save_pretrained(self, directory: str | os.PathLike, *, card_extra: dict[str, Any] | None = None) -> Path:
        """Write config.json, model.safetensors and README.md into ``directory``, atomically.

        Files are written into a temporary sibling directory that is then renamed into place, so a reader
        never sees a half-written tokenizer. An existing directory is replaced.
        """

        def write(staging: Path) -> None:
            (staging / CONFIG_NAME).write_text(json.dumps(self._config_document(), indent=2) + "\n")
            save_model(self, str(staging / WEIGHTS_NAME))
            (staging / CARD_NAME).write_text(self._model_card(card_extra or {}))

        return write_directory_atomically(directory, write)

    @classmethod
    def from_pretrained(
        cls, dir_or_hub_id: str | os.PathLike, *, map_location: str | torch.device = "cpu"
    ) -> LatentTokenizer:
        """Load a tokenizer saved by :meth:`save_pretrained` from a directory or a Hugging Face hub repo.

        The directory's config.json names the tokenizer's method, which picks the class: an AlignTok
        directory gives an :class:`AlignTokTokenizer`, a baseline's a ``VAETokenizer``, whichever of these
        classes this is called on. A diffusers ``AutoencoderKL`` directory, or hub id ``ORG/NAME[:SUBFOLDER]``
        of one, gives a ``DiffusersVAETokenizer`` (:mod:`aligntok.models.diffusers_vae`).
        """
        directory = resolve_directory(str(dir_or_hub_id), what="tokenizer", error=TokenizerNotFoundError)
        if diffusers_class_name(directory) is not None:
            from aligntok.models.diffusers_vae import (
                DiffusersVAETokenizer,  # here: that module imports this one
            )

            return DiffusersVAETokenizer.from_diffusers(directory, source=str(dir_or_hub_id)).to(map_location).eval()
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if (directory / "model_index.json").is_file():
            raise TokenizerNotFoundError(
                f"'{dir_or_hub_id}' is a diffusers pipeline: name its VAE, e.g. DIRECTORY/vae or HUB_ID:vae"
            )
        if not config_path.is_file() or not weights_path.is_file():
            raise TokenizerNotFoundError(
                f"'{directory}' is not a saved aligntok tokenizer (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        with reading(config_path):
            document = json.loads(config_path.read_text())
        if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
            raise TokenizerNotFoundError(
                f"{config_path} is not an aligntok tokenizer config (format={document.get('format')!r})"
            )
        # Directories written before the key existed are AlignTok tokenizers.
        tokenizer = tokenizer_class(document.get("method", ALIGNTOK_METHOD))._from_document(document)
        with reading(weights_path):
            missing, unexpected = load_model(tokenizer, str(weights_path), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights_path} does not match the architecture in {CONFIG_NAME}: "
                f"{len(missing)} missing and {len(unexpected)} unexpected tensors "
                f"(first: {(list(missing) or list(unexpected))[0]})"
            )
        return tokenizer.to(map_location).eval()

    @classmethod
    def _from_document(cls, document: dict[str, Any]) -> LatentTokenizer:
        """The architecture described by a config.json document, with freshly initialised weights."""
        raise NotImplementedError

    def _config_document(self) -> dict[str, Any]:
        from aligntok import __version__

        return {
            "format": FORMAT_NAME,
            "method": self.method,
            "aligntok_version": __version__,
            "tokenizer": config_to_dict(self.config),
        }

    def _card_summary(self) -> tuple[str, list[str], list[str]]:
        """The model card's title, its opening paragraph, and bullet lines about the encoder side."""
        raise NotImplementedError

    def _model_card(self, extra: dict[str, Any]) -> str:
        counts = self.parameter_counts()
        c, s = self.latent_channels, self.stride
        stats = "set (used by normalize_latents)" if self.config.latent_mean is not None else "not computed yet"
        title, paragraph, bullets = self._card_summary()
        lines = [
            f"# {title}",
            "",
            *paragraph,
            "",
            *bullets,
            f"- Latent: {c} channels at stride {s} (a 256x256 image gives {c}x{256 // s}x{256 // s}).",
            "- Parameters: " + ", ".join(f"{name} {count:,}" for name, count in counts.items()) + ".",
            f"- Latent statistics: {stats}.",
            "",
            "## Usage",
            "",
            "```python",
            "from aligntok import AlignTokTokenizer",
            "",
            'tok = AlignTokTokenizer.from_pretrained("<this directory or hub id>")',
            f"z = tok.encode(x)      # x: float tensor (B, 3, H, W) in [-1, 1], H and W multiples of {s}",
            "x_hat = tok.decode(z)  # (B, 3, H, W)",
            "```",
        ]
        if extra:
            lines += ["", "## Details", "", "| key | value |", "|---|---|"]
            lines += [f"| {key} | {_card_value(value)} |" for key, value in extra.items()]
        tags = ["aligntok", "image-tokenizer", "latent-diffusion", self.method]
        # No license here: the weights' sources decide it; push_to_hub sets one.
        return model_card("\n".join(lines), tags=tags, license=None, base_model=self.card_base_model())

    def card_base_model(self) -> str | None:
        """The hub id of the model this tokenizer starts from, for the card's ``base_model`` (None: trained from scratch)."""
        return None


class AlignTokTokenizer(LatentTokenizer):
    """Foundation encoder + adapter + CNN decoder (AlignTok, ICLR 2026). Build with :meth:`from_config` or :meth:`from_pretrained`.

    ``encode``: images (B, 3, H, W) float in [-1, 1], H and W multiples of :attr:`stride` (16 by default) ->
    latents (B, latent_channels, H / stride, W / stride); ``decode`` inverts it (images not clamped).
    ``normalize_latents`` / ``denormalize_latents`` apply the per-channel statistics ``cache-latents``
    records. Bad inputs raise a one-line ValueError; a missing directory a :class:`TokenizerNotFoundError`.
    """

    method = ALIGNTOK_METHOD
    parts = ("encoder", "adapter", "decoder")

    def __init__(self, config: TokenizerConfig, encoder: FoundationEncoder) -> None:
        super().__init__(config)
        if encoder.stride != config.decoder.stride:
            raise ValueError(f"encoder stride {encoder.stride} differs from the decoder's {config.decoder.stride}")
        self.encoder = encoder
        self.adapter = Adapter(encoder.hidden_size, config.adapter_hidden, config.latent_channels)
        self.decoder = LatentDecoder(config.latent_channels, config.decoder)

    @classmethod
    def from_config(cls, config: TokenizerConfig) -> AlignTokTokenizer:
        """A new tokenizer: the encoder ``config.encoder`` names (pretrained, or random), fresh adapter and decoder."""
        return cls(config, build_foundation_encoder(config))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features before the adapter (B, hidden, h, w) and after it (the latent, B, C, h, w)."""
        self.check_images(x)
        pre = self.encoder(x)
        return pre, self.adapter(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent_channels, H / stride, W / stride) of images in [-1, 1] (in tiles if enabled)."""
        self.check_images(x)
        return self.tiled_encode(lambda tile: self.features(tile)[1], x)

    @classmethod
    def _from_document(cls, document: dict[str, Any]) -> AlignTokTokenizer:
        config = config_from_dict(TokenizerConfig, document["tokenizer"])
        encoder_doc = document["encoder"]
        encoder = build_encoder_from_config(encoder_doc["kind"], encoder_doc["hf_config"], stride=config.decoder.stride)
        return cls(config, encoder)

    def _config_document(self) -> dict[str, Any]:
        return {
            **super()._config_document(),
            "encoder": {"kind": self.encoder.kind, "hf_config": self.encoder.hf_config.to_dict()},
        }

    def card_base_model(self) -> str | None:
        name = self.config.encoder
        return None if name == RANDOM_ENCODER or ":" in name or looks_like_local_path(name) else name

    def _card_summary(self) -> tuple[str, list[str], list[str]]:
        paragraph = [
            "A pretrained vision foundation encoder aligned into an image tokenizer for latent diffusion",
            "(AlignTok, ICLR 2026): foundation encoder -> per-token MLP adapter -> latent -> CNN decoder.",
        ]
        return "AlignTok image tokenizer", paragraph, [
            (
                f"- Encoder: `{self.config.encoder}` ({self.encoder.kind}, {self.encoder.hidden_size}-d tokens, "
                f"patch {self.encoder.patch_size}); its weights (fine-tuned in stage 2) are in model.safetensors."
            ),
        ]


def tokenizer_class(method: str) -> type[LatentTokenizer]:
    """The class that loads a config.json whose ``method`` is this: AlignTok's, or the baselines' VAE."""
    # Imported here: these modules import this one.
    from aligntok.models.baselines import VAETokenizer
    from aligntok.models.diffusers_vae import DiffusersVAETokenizer

    classes: dict[str, type[LatentTokenizer]] = {
        ALIGNTOK_METHOD: AlignTokTokenizer, VAETokenizer.method: VAETokenizer,
        DiffusersVAETokenizer.method: DiffusersVAETokenizer,
    }
    if method not in classes:
        raise TokenizerNotFoundError(
            f"unknown tokenizer method {method!r} in {CONFIG_NAME}; known: {', '.join(classes)}"
        )
    return classes[method]


def _describe(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _card_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def diffusers_class_name(directory: Path) -> str | None:
    """The ``_class_name`` in a diffusers model directory's config.json (e.g. AutoencoderKL); None for anything else."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return document.get("_class_name") if isinstance(document, dict) else None
