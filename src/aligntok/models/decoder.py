"""The latent-diffusion CNN decoder (VA-VAE's f16d32 settings), built from diffusers' ``Decoder``.

With base 128 channels, multipliers (1, 1, 2, 2, 4), 2 residual blocks per level and attention in the
lowest-resolution level it has 41,417,603 parameters for 32 latent channels (the paper's "~42M").
As in LDM, the mid block always has attention; ``attention_at_lowest`` adds it after every residual block of
the first (lowest-resolution) up level, which is 16x16 for a 256 px image at stride 16.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.models.autoencoders.vae import Decoder
from torch import nn

from aligntok.config import ConfigError


@dataclasses.dataclass
class DecoderConfig:
    """Architecture of the CNN decoder; stride = 2 ** (len(channel_mult) - 1)."""

    base_channels: int = 128  #: channels of the highest-resolution level
    channel_mult: list[int] = dataclasses.field(
        default_factory=lambda: [1, 1, 2, 2, 4]
    )  #: per level, high to low resolution
    layers_per_block: int = 2  #: residual blocks per level (diffusers adds one more in each up block, as LDM does)
    attention_at_lowest: bool = True  #: self-attention after each residual block of the lowest-resolution level
    norm_groups: int = 32  #: GroupNorm groups; must divide every level's channel count

    def validate(self) -> None:
        if self.base_channels <= 0 or self.layers_per_block <= 0 or self.norm_groups <= 0:
            raise ConfigError("base_channels, layers_per_block and norm_groups must be positive")
        if not self.channel_mult or min(self.channel_mult) <= 0:
            raise ConfigError(f"channel_mult={list(self.channel_mult)} must be a non-empty list of positive ints")
        for channels in self.block_channels:
            if channels % self.norm_groups:
                raise ConfigError(f"norm_groups={self.norm_groups} does not divide a level's {channels} channels")

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def stride(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class LatentDecoder(nn.Module):
    """Maps latents (B, latent_channels, h, w) to images (B, 3, h * stride, w * stride)."""

    def __init__(self, latent_channels: int, cfg: DecoderConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or DecoderConfig()
        cfg.validate()
        if latent_channels <= 0:
            raise ValueError(f"latent_channels must be positive, got {latent_channels}")
        self.config = cfg
        self.latent_channels = latent_channels
        self.stride = cfg.stride
        num_levels = len(cfg.channel_mult)
        # diffusers lists up blocks from the lowest resolution up.
        up_blocks = ["UpDecoderBlock2D"] * num_levels
        if cfg.attention_at_lowest:
            up_blocks[0] = "AttnUpDecoderBlock2D"
        self.net = Decoder(
            in_channels=latent_channels,
            out_channels=3,
            up_block_types=tuple(up_blocks),
            block_out_channels=cfg.block_channels,
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_groups,
            act_fn="silu",
            mid_block_add_attention=True,
        )

    @property
    def last_layer(self) -> nn.Parameter:
        """The output convolution's weight: where the adaptive GAN weight compares gradient norms."""
        return self.net.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"decoder expects latents (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.net(z)
