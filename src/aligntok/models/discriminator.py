"""PatchGAN discriminator in the pix2pix / latent-diffusion layout, with a choice of normalisation.

Layout for ``num_layers=3``, ``base_channels=64``: conv 4x4/2 (64) -> [conv 4x4/2 (128), norm] ->
[conv 4x4/2 (256), norm] -> [conv 4x4/1 (512), norm] -> conv 4x4/1 (1), LeakyReLU(0.2) after every
hidden conv. It outputs one logit per overlapping patch (a 30x30 map for a 256 px image).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from aligntok.config import ConfigError, check_choice

NORM_CHOICES = ("group", "batch", "none")


@dataclasses.dataclass
class DiscriminatorConfig:
    """PatchGAN size and normalisation."""

    base_channels: int = 64  #: channels of the first conv; doubled per layer up to 8x
    num_layers: int = 3  #: strided conv layers after the first (pix2pix n_layers)
    # GroupNorm by default: BatchNorm (LDM's choice) makes each rank's loss depend on its own per-rank batch
    # statistics under data parallelism, so results change with the number of GPUs; GroupNorm does not.
    norm: str = "group"  #: group | batch | none
    norm_groups: int = 32  #: GroupNorm groups; must divide base_channels

    def validate(self) -> None:
        check_choice("norm", self.norm, NORM_CHOICES)
        if self.base_channels <= 0 or self.num_layers <= 0:
            raise ConfigError("base_channels and num_layers must be positive")
        if self.norm == "group" and (self.norm_groups <= 0 or self.base_channels % self.norm_groups):
            raise ConfigError(f"norm_groups={self.norm_groups} does not divide base_channels={self.base_channels}")


def _conv_out(size: int, stride: int) -> int:
    return (size + 2 - 4) // stride + 1  # kernel 4, padding 1


class PatchDiscriminator(nn.Module):
    """Maps images (B, 3, H, W) to patch logits (B, 1, H', W')."""

    def __init__(self, cfg: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or DiscriminatorConfig()
        cfg.validate()
        self.config = cfg
        widths = [cfg.base_channels * min(2**i, 8) for i in range(cfg.num_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        self._strides = [2]
        for i in range(1, cfg.num_layers + 1):
            stride = 2 if i < cfg.num_layers else 1
            # A norm with its own affine shift makes the conv bias redundant.
            layers += [
                nn.Conv2d(widths[i - 1], widths[i], 4, stride=stride, padding=1, bias=cfg.norm == "none"),
                self._norm(widths[i]),
                nn.LeakyReLU(0.2, True),
            ]
            self._strides.append(stride)
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self._strides.append(1)
        self.net = nn.Sequential(*layers)
        self.apply(self._init_weights)

    def _norm(self, channels: int) -> nn.Module:
        if self.config.norm == "group":
            return nn.GroupNorm(self.config.norm_groups, channels)
        if self.config.norm == "batch":
            return nn.BatchNorm2d(channels)
        return nn.Identity()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # DCGAN/pix2pix initialisation, as in LDM.
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def min_input_size(self) -> int:
        """Smallest image side that still leaves at least one output logit."""
        size = 1
        while self._output_size(size) < 1:
            size += 1
        return size

    def _output_size(self, size: int) -> int:
        for stride in self._strides:
            size = _conv_out(size, stride)
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"discriminator expects images (B, 3, H, W), got {tuple(x.shape)}")
        if min(self._output_size(x.shape[-2]), self._output_size(x.shape[-1])) < 1:
            raise ValueError(
                f"images of {x.shape[-2]}x{x.shape[-1]} px are too small for a {self.config.num_layers}-layer "
                f"PatchGAN (needs at least {self.min_input_size()} px per side)"
            )
        return self.net(x)
