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

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, h * stride, w * stride), nominally in [-1, 1] (not clamped), from latents (in tiles if enabled)."""
        return self.tiled_decode(lambda latents: self.vae.decode(latents).sample, z)

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
