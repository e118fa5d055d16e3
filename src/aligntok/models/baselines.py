"""The baseline tokenizers AlignTok is compared with: a plain KL-VAE and a VA-VAE-style VAE.

Both are one model, :class:`VAETokenizer`: the latent-diffusion CNN encoder (diffusers' ``Encoder`` with
the levels of the decoder mirrored, ``double_z`` giving the mean and log-variance of a diagonal Gaussian
posterior), trained from scratch, in front of exactly AlignTok's CNN decoder and latent shape. They differ
only in how they are trained (:mod:`aligntok.training.stages`): the plain VAE minimises the reconstruction
loss plus a small KL term; the VA-VAE adds the VF loss (:mod:`aligntok.losses.vf`), which aligns its
latent with a frozen foundation encoder's features. Training decodes posterior samples; :meth:`encode`
returns the posterior mean, so encoding is deterministic.

Save and load like every aligntok tokenizer: ``AlignTokTokenizer.from_pretrained(dir)`` returns a
:class:`VAETokenizer` for a directory written by one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers.models.autoencoders.vae import Encoder
from torch import nn

from aligntok.config import ConfigError, check_choice, config_from_dict
from aligntok.models.decoder import DecoderConfig, LatentDecoder
from aligntok.models.tokenizer import (
    LatentTokenizer,
    TokenizerConfig,
    validate_latent_stats,
)

BASELINE_METHODS = ("vae", "vavae")  #: training recipes of the baselines (the same architecture)
LOGVAR_RANGE = (-30.0, 20.0)  # LDM clamps the posterior's log-variance to this range


@dataclasses.dataclass
class VAEConfig:
    """Architecture of a baseline VAE tokenizer; its encoder mirrors ``decoder`` (LDM and VA-VAE share one config)."""

    latent_channels: int = 32  #: latent channels (32 = VA-VAE's f16d32)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)  #: CNN decoder; the encoder mirrors it
    trained_with: str = "vae"  #: vae (L_rec + KL) | vavae (+ VF loss): recorded for model cards and reports
    latent_mean: list[float] | None = None  #: per-channel latent mean over the training set (set by cache-latents)
    latent_std: list[float] | None = None  #: per-channel latent std over the training set (set by cache-latents)

    def validate(self) -> None:
        self.decoder.validate()
        check_choice("trained_with", self.trained_with, BASELINE_METHODS)
        if self.latent_channels <= 0:
            raise ConfigError("latent_channels must be positive")
        validate_latent_stats(self.latent_mean, self.latent_std, self.latent_channels)

    @classmethod
    def like(cls, model: TokenizerConfig, trained_with: str) -> VAEConfig:
        """The baseline with the same latent shape and decoder as the AlignTok tokenizer ``model`` describes."""
        return cls(
            latent_channels=model.latent_channels,
            decoder=dataclasses.replace(model.decoder, channel_mult=list(model.decoder.channel_mult)),
            trained_with=trained_with,
        )


@dataclasses.dataclass
class KLConfig:
    """The VAE's KL term, KL(q(z|x) || N(0, I))."""

    weight: float = 1e-6  #: (from LDM / VA-VAE) relative to the reconstruction loss summed over pixels, as there

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"weight={self.weight} must be >= 0")


class CNNEncoder(nn.Module):
    """Images (B, 3, H, W) -> posterior mean and log-variance, each (B, latent_channels, H / stride, W / stride).

    The decoder's levels in reverse: the same channels, residual blocks per level and attention in the
    lowest-resolution level (16x16 for a 256 px image at stride 16, as VA-VAE's ``attn_resolutions``).
    LDM's 1x1 ``quant_conv`` after the output convolution is left out: a linear map after a linear map.
    """

    def __init__(self, latent_channels: int, cfg: DecoderConfig) -> None:
        super().__init__()
        cfg.validate()
        if latent_channels <= 0:
            raise ValueError(f"latent_channels must be positive, got {latent_channels}")
        self.latent_channels = latent_channels
        self.stride = cfg.stride
        # diffusers lists down blocks from the highest resolution down.
        down_blocks = ["DownEncoderBlock2D"] * len(cfg.channel_mult)
        if cfg.attention_at_lowest:
            down_blocks[-1] = "AttnDownEncoderBlock2D"
        self.net = Encoder(
            in_channels=3,
            out_channels=latent_channels,
            down_block_types=tuple(down_blocks),
            block_out_channels=cfg.block_channels,
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_groups,
            act_fn="silu",
            double_z=True,
            mid_block_add_attention=True,
        )

    @property
    def last_layer(self) -> nn.Parameter:
        """The output convolution's weight: where VA-VAE's adaptive VF weight compares gradient norms."""
        return self.net.conv_out.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.net(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """A reparameterised sample ``mean + exp(logvar / 2) * eps`` (from torch's global RNG, so resumable)."""
    return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)


def diagonal_gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample (B,), summed over the latent's elements, in fp32."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


class VAETokenizer(LatentTokenizer):
    """CNN encoder (Gaussian posterior) + AlignTok's CNN decoder. The plain VAE and the VA-VAE baselines."""

    method = "vae"
    parts = ("encoder", "decoder")

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        self.encoder = CNNEncoder(config.latent_channels, config.decoder)
        self.decoder = LatentDecoder(config.latent_channels, config.decoder)

    @classmethod
    def from_config(cls, config: VAEConfig) -> VAETokenizer:
        """A new, randomly initialised VAE."""
        return cls(config)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | x), each (B, latent_channels, H / stride, W / stride)."""
        self.check_images(x)
        return self.encoder(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean (deterministic), (B, latent_channels, H / stride, W / stride); in tiles if enabled."""
        self.check_images(x)
        return self.tiled_encode(lambda tile: self.posterior(tile)[0], x)

    @classmethod
    def _from_document(cls, document: dict[str, Any]) -> VAETokenizer:
        return cls(config_from_dict(VAEConfig, document["tokenizer"]))

    def _card_summary(self) -> tuple[str, list[str], list[str]]:
        recipe = {
            "vae": "a plain KL-VAE: reconstruction loss (L1 + LPIPS + adaptive GAN) plus a small KL term",
            "vavae": (
                "a VA-VAE-style VAE: the plain VAE's losses plus the VF loss aligning the latent with a frozen "
                "foundation encoder's features"
            ),
        }[self.config.trained_with]
        paragraph = [
            "A baseline image tokenizer from aligntok, trained under the same protocol as AlignTok for comparison:",
            f"{recipe}.",
        ]
        bullets = [
            "- Encoder: latent-diffusion CNN encoder trained from scratch; `encode` returns the posterior mean.",
            "- Decoder: the same latent-diffusion CNN decoder as the AlignTok tokenizer.",
        ]
        return f"aligntok baseline tokenizer ({self.config.trained_with})", paragraph, bullets
