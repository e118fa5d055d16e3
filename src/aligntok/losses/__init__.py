"""Tokenizer losses. Each loss returns ``(total, logs)`` with logs a dict of detached 0-d tensors."""

from aligntok.losses.reconstruction import (
    LpipsWeightsMissingError,
    ReconLossConfig,
    ReconstructionLoss,
    adaptive_gan_weight,
    build_lpips,
    hinge_discriminator_loss,
)
from aligntok.losses.semantic import SemanticLossConfig, SemanticPreservationLoss

__all__ = [
    "LpipsWeightsMissingError",
    "ReconLossConfig",
    "ReconstructionLoss",
    "SemanticLossConfig",
    "SemanticPreservationLoss",
    "adaptive_gan_weight",
    "build_lpips",
    "hinge_discriminator_loss",
]
