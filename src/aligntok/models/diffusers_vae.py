"""Any diffusers ``AutoencoderKL`` (SD-VAE, SDXL-VAE, the FLUX VAE, a converted VA-VAE) as an aligntok tokenizer.

Every aligntok command that takes a tokenizer accepts, besides a saved aligntok tokenizer:

* a diffusers model directory whose ``config.json`` has ``"_class_name": "AutoencoderKL"``
  (what ``AutoencoderKL.save_pretrained`` writes, e.g. ``PIPELINE_DIR/vae``);
* a Hugging Face hub id of one, ``ORG/NAME``, or ``ORG/NAME:SUBFOLDER`` for a VAE inside a pipeline
  repository (``black-forest-labs/FLUX.1-schnell:vae``). Hub ids resolve through huggingface_hub, so they
  work offline (``HF_HUB_OFFLINE=1``) from a Hugging Face cache that holds them.

:meth:`LatentTokenizer.from_pretrained` dispatches such a source to :class:`DiffusersVAETokenizer`.

Encoding returns the posterior mean (deterministic, as aligntok's own VAE baselines and LightningDiT's
VA-VAE do); ``posterior="sample"`` draws from the posterior with torch's global RNG instead. Latent
normalisation, ``(z - latent_mean) / latent_std`` per channel as for every aligntok tokenizer, starts
from the VAE config's constants as diffusers pipelines use them: ``(z - shift_factor) * scaling_factor``,
or ``(z - latents_mean) * scaling_factor / latents_std`` where the config has per-channel ``latents_mean``
and ``latents_std``. ``aligntok cache-latents`` replaces them with per-channel statistics of the dataset
(in a saved aligntok copy of the VAE, since a diffusers directory or hub cache is not ours to write).

``save_pretrained`` writes an ordinary aligntok tokenizer directory (config.json holding the diffusers
config, model.safetensors, README.md); it loads back with ``from_pretrained`` like any other.

The FLUX-VAE baseline (``method: flux-vae`` in ``aligntok train-tokenizer``) is this class around an
AutoencoderKL of :class:`FluxVAEConfig`'s shape (FLUX.1's VAE: f8, 16 latent channels) trained from
scratch; :meth:`DiffusersVAETokenizer.posterior` gives the training stage its KL term.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import torch

from aligntok.config import ConfigError, check_choice, config_from_dict
from aligntok.hub import split_hub_source
from aligntok.models.encoders import looks_like_local_path
from aligntok.models.tokenizer import (
    LatentTokenizer,
    TokenizerNotFoundError,
    diffusers_class_name,
    validate_latent_stats,
)

DIFFUSERS_CLASS = "AutoencoderKL"
POSTERIOR_CHOICES = ("mean", "sample")
TRAINED_SOURCE = "aligntok train-tokenizer (flux-vae, from scratch)"  #: ``source`` of a VAE aligntok trained


@dataclasses.dataclass
class FluxVAEConfig:
    """An AutoencoderKL's architecture; the defaults are FLUX.1's VAE (FLUX.1-schnell ``vae/config.json``).

    Stride ``2 ** (len(block_out_channels) - 1)`` (8 for FLUX), ``latent_channels`` channels (16). FLUX
    has no 1x1 quant convolutions around the latent. ``scaling_factor``/``shift_factor`` are FLUX's
    normalisation constants; they are recorded in the diffusers config only: a VAE trained from scratch
    has its own latent statistics, which ``cache-latents`` (or ``train-t2i``) measures.
    """

    block_out_channels: list[int] = dataclasses.field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def stride(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        if not self.block_out_channels or min(self.block_out_channels) <= 0:
            raise ConfigError("block_out_channels must be a non-empty list of positive widths")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups={self.norm_num_groups}")
        if self.latent_channels <= 0 or self.layers_per_block <= 0:
            raise ConfigError("latent_channels and layers_per_block must be positive")

    def diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments of ``diffusers.AutoencoderKL`` for this architecture."""
        levels = len(self.block_out_channels)
        return {
            **dataclasses.asdict(self), "block_out_channels": tuple(self.block_out_channels),
            "in_channels": 3, "out_channels": 3, "act_fn": "silu", "force_upcast": True,
            "down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels,
        }


@dataclasses.dataclass
class DiffusersVAEConfig:
    """An AutoencoderKL wrapped as a tokenizer; the VAE's own architecture is its diffusers config."""

    source: str = ""  #: where the VAE was loaded from: a diffusers directory, or a hub id (ORG/NAME[:SUBFOLDER])
    latent_channels: int = 4  #: the VAE's latent channels (from its config)
    posterior: str = "mean"  #: encode returns the posterior mean (deterministic) | a sample (torch's global RNG)
    latent_mean: list[float] | None = None  #: per-channel latent mean (VAE config constants, or cache-latents')
    latent_std: list[float] | None = None  #: per-channel latent std (VAE config constants, or cache-latents')

    def validate(self) -> None:
        check_choice("posterior", self.posterior, POSTERIOR_CHOICES)
        if self.latent_channels <= 0:
            raise ConfigError("latent_channels must be positive")
        validate_latent_stats(self.latent_mean, self.latent_std, self.latent_channels)


def config_latent_stats(vae_config: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) equivalent to the normalisation diffusers pipelines apply with this VAE config.

    Pipelines map a latent ``z`` to ``(z - shift_factor) * scaling_factor`` (SD, SDXL, FLUX), or to
    ``(z - latents_mean) * scaling_factor / latents_std`` where the config lists per-channel values;
    as ``(z - mean) / std`` that is ``mean = shift_factor`` (or ``latents_mean``) and
    ``std = 1 / scaling_factor`` (or ``latents_std / scaling_factor``).
    """
    channels = int(vae_config["latent_channels"])
    scale = float(vae_config.get("scaling_factor") or 1.0)
    mean = vae_config.get("latents_mean")
    std = vae_config.get("latents_std")
    if mean is not None and std is not None:
        return [float(m) for m in mean], [float(s) / scale for s in std]
    shift = float(vae_config.get("shift_factor") or 0.0)
    return [shift] * channels, [1.0 / scale] * channels


class DiffusersVAETokenizer(LatentTokenizer):
    """A diffusers ``AutoencoderKL`` (``self.vae``) behind aligntok's tokenizer interface.

    ``encode``: images (B, 3, H, W) in [-1, 1], H and W multiples of :attr:`stride` -> latents
    (B, latent_channels, H / stride, W / stride), the posterior mean unless ``config.posterior="sample"``.
    ``decode``: latents -> images (B, 3, h * stride, w * stride), nominally in [-1, 1], not clamped.
    Build with :meth:`from_diffusers` (or any aligntok ``from_pretrained`` given a diffusers source).
    """

    method = "diffusers-vae"
    parts = ("vae",)

    def __init__(self, config: DiffusersVAEConfig, vae: Any) -> None:
        super().__init__(config)
        if int(vae.config.latent_channels) != config.latent_channels:
            raise ValueError(
                f"the VAE has {vae.config.latent_channels} latent channels, its tokenizer config {config.latent_channels}"
            )
        self.vae = vae

    @classmethod
    def from_diffusers(
        cls, directory: str | Path, *, source: str | None = None, posterior: str = "mean"
    ) -> DiffusersVAETokenizer:
        """Load the AutoencoderKL saved in ``directory`` (a diffusers model directory, e.g. ``PIPELINE/vae``).

        ``source`` (default: the directory) is recorded in the config and the model card. Latent
        statistics start from the VAE config's normalisation constants (:func:`config_latent_stats`).
        Raises :class:`TokenizerNotFoundError` (one line) unless the directory holds an AutoencoderKL.
        """
        from diffusers import AutoencoderKL

        directory = Path(directory)
        found = diffusers_class_name(directory)
        if found != DIFFUSERS_CLASS:
            what = f"a diffusers {found}" if found else "not a diffusers model directory"
            raise TokenizerNotFoundError(f"'{directory}' is {what}; only {DIFFUSERS_CLASS} VAEs load as tokenizers")
        try:
            # Without accelerate diffusers warns on every load unless told to skip its low-memory path.
            vae = AutoencoderKL.from_pretrained(directory, low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
        except (OSError, ValueError) as e:
            raise TokenizerNotFoundError(f"cannot load the {DIFFUSERS_CLASS} in '{directory}': {str(e).splitlines()[0]}") from None
        mean, std = config_latent_stats(dict(vae.config))
        config = DiffusersVAEConfig(
            source=source or str(directory.resolve()), latent_channels=int(vae.config.latent_channels),
            posterior=posterior, latent_mean=mean, latent_std=std,
        )
        return cls(config, vae)

    @classmethod
    def from_scratch(cls, config: FluxVAEConfig, *, source: str = TRAINED_SOURCE) -> DiffusersVAETokenizer:
        """A randomly initialised AutoencoderKL of ``config``'s architecture (torch's global RNG).

        Latent statistics are left unset: a fresh VAE's latents have none of FLUX's scale.
        """
        from diffusers import AutoencoderKL

        config.validate()
        vae = AutoencoderKL(**config.diffusers_config())
        return cls(DiffusersVAEConfig(source=source, latent_channels=config.latent_channels), vae)

    @property
    def stride(self) -> int:
        # AutoencoderKL halves the resolution in every down block but the last (diffusers' vae_scale_factor).
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent_channels, H / stride, W / stride) of images in [-1, 1]: the posterior mean or a sample."""
        self.check_images(x)
        return self.tiled_encode(self._encode_whole, x)

    def _encode_whole(self, x: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(x).latent_dist
        return posterior.mean if self.config.posterior == "mean" else posterior.sample()

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | x), each (B, latent_channels, H / stride, W / stride).

        The log-variance is clamped to [-30, 20] by diffusers, as LDM and aligntok's VAE baselines do.
        """
        self.check_images(x)
        posterior = self.vae.encode(x).latent_dist
        return posterior.mean, posterior.logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, h * stride, w * stride), nominally in [-1, 1] (not clamped), from latents (in tiles if enabled)."""
        return self.tiled_decode(lambda latents: self.vae.decode(latents).sample, z)

    @property
    def decoder_last_layer(self) -> torch.nn.Parameter:
        """The decoder's output convolution weight (where the adaptive GAN weight compares gradients)."""
        return self.vae.decoder.conv_out.weight

    @classmethod
    def _from_document(cls, document: dict[str, Any]) -> DiffusersVAETokenizer:
        from diffusers import AutoencoderKL

        config = config_from_dict(DiffusersVAEConfig, document["tokenizer"])
        return cls(config, AutoencoderKL.from_config(document["vae"]["config"]))

    def _config_document(self) -> dict[str, Any]:
        vae_config = {k: v for k, v in self.vae.config.items() if not k.startswith("_")}
        return {**super()._config_document(), "vae": {"class": DIFFUSERS_CLASS, "config": vae_config}}

    def card_base_model(self) -> str | None:
        source = self.config.source
        return None if looks_like_local_path(source) or Path(source).exists() else split_hub_source(source)[0]

    def _card_summary(self) -> tuple[str, list[str], list[str]]:
        paragraph = [
            f"A diffusers `{DIFFUSERS_CLASS}` used as an image tokenizer by aligntok, so that latent diffusion on it",
            "is trained, sampled and evaluated under the same protocol as on AlignTok's tokenizers.",
        ]
        bullets = [
            f"- Source: `{self.config.source}`; `encode` returns the posterior {self.config.posterior}.",
            (
                f"- Config normalisation: scaling_factor={self.vae.config.scaling_factor}, "
                f"shift_factor={self.vae.config.shift_factor}."
            ),
        ]
        return f"{DIFFUSERS_CLASS} tokenizer ({self.config.source})", paragraph, bullets
