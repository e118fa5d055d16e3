"""VA-VAE's VF loss ("vision foundation model alignment", Yao et al., "Reconstruction vs. Generation").

The VAE's latent ``z`` goes through a learned 1x1 projection (no bias) to the foundation encoder's width,
then is compared, token by token, with the frozen foundation encoder's features ``f`` of the same image:

- marginal cosine similarity: ``mean_ij relu(1 - m1 - cos(z'_ij, f_ij))``;
- marginal distance matrix: per image, ``mean_ab relu(|cos(z'_a, z'_b) - cos(f_a, f_b)| - m2)`` over token
  pairs ``a, b``, i.e. the tokens' cosine-similarity matrices must agree up to ``m2``.

Both use the projected latent, as VA-VAE's public code does. The foundation features are, by default
(``preprocess: vavae``), those of VA-VAE's code: its DINOv2 gets the image as the VAE does, in [-1, 1]
without ImageNet normalisation, resized bilinearly without antialiasing (256 -> 224 px);
``preprocess: encoder`` feeds it as AlignTok's encoder is fed instead (the encoder's pixel mean/std and an
antialiased resize). The margins leave the latent free where it is
already close enough (there the loss and its gradient are exactly zero), which VA-VAE found to help
reconstruction. The sum of the two terms is weighted adaptively: ``w_hyper * ||grad nll|| / ||grad L_vf||``
with both gradients taken at the encoder's last layer, ``nll`` being the L1 + LPIPS term alone (as in
VA-VAE). As for the GAN weight (:mod:`aligntok.losses.reconstruction`), the ratio is taken in VA-VAE's
units, where the nll is summed over each image's C*H*W values, clamped there at ``adaptive_max`` (1e8),
and divided by C*H*W to weight our mean-reduced losses.

The foundation encoder is deliberately held outside the module tree (this class is not an ``nn.Module``),
so it never appears in a checkpoint or a saved tokenizer; the trainable :attr:`VFLoss.projection` is a
module of its own, which the training task checkpoints.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from aligntok.config import ConfigError, check_choice
from aligntok.losses.reconstruction import adaptive_gan_weight


@dataclasses.dataclass
class VFLossConfig:
    """Margins and weights of the VF loss (defaults: VA-VAE's released f16d32 configuration)."""

    weight: float = 0.1  #: w_hyper (from VA-VAE): scales the adaptive weight, or is the weight when adaptive=false
    cos_margin: float = 0.5  #: m1 (from VA-VAE): per-token cosine similarity above 1 - m1 is left alone
    distmat_margin: float = 0.25  #: m2 (from VA-VAE): similarity-matrix differences below m2 are left alone
    cos_weight: float = 1.0  #: weight of the marginal cosine term (from VA-VAE)
    distmat_weight: float = 1.0  #: weight of the marginal distance-matrix term (from VA-VAE)
    adaptive: bool = True  #: (from VA-VAE) w = w_hyper * ||grad L_rec|| / ||grad L_vf|| at the encoder's last layer
    adaptive_max: float = 1e8  #: upper clamp of the adaptive weight, in VA-VAE's units (nll summed over C*H*W; from VA-VAE)
    #: vavae: the foundation encoder sees the [-1, 1] image, bilinearly resized without antialiasing, not
    #: normalised (VA-VAE's code) | encoder: its own pixel mean/std and an antialiased resize (as AlignTok's)
    preprocess: str = "vavae"

    def validate(self) -> None:
        check_choice("preprocess", self.preprocess, ("vavae", "encoder"))
        if min(self.weight, self.cos_weight, self.distmat_weight) < 0:
            raise ConfigError("weight, cos_weight and distmat_weight must be >= 0")
        if not 0 <= self.cos_margin <= 2 or not 0 <= self.distmat_margin <= 2:
            raise ConfigError(
                f"cos_margin={self.cos_margin} and distmat_margin={self.distmat_margin} must lie in [0, 2] "
                "(cosine similarities differ by at most 2)"
            )
        if self.adaptive_max <= 0:
            raise ConfigError(f"adaptive_max={self.adaptive_max} must be > 0")


def _check_pair(z: torch.Tensor, features: torch.Tensor) -> None:
    if z.ndim != 4 or z.shape != features.shape:
        raise ValueError(
            f"projected latent {tuple(z.shape)} and foundation features {tuple(features.shape)} must both be "
            "(B, C, h, w) of the same shape"
        )


def marginal_cosine_loss(z: torch.Tensor, features: torch.Tensor, margin: float) -> torch.Tensor:
    """``mean over tokens of relu(1 - margin - cos(z_token, f_token))``; inputs (B, C, h, w), channels compared."""
    _check_pair(z, features)
    return F.relu(1.0 - margin - F.cosine_similarity(z, features, dim=1)).mean()


def marginal_distance_matrix_loss(z: torch.Tensor, features: torch.Tensor, margin: float) -> torch.Tensor:
    """``mean over images and token pairs of relu(|S_z - S_f| - margin)``, S the tokens' cosine-similarity matrix."""
    _check_pair(z, features)

    def similarity(t: torch.Tensor) -> torch.Tensor:
        tokens = F.normalize(t.flatten(2), dim=1)  # (B, C, N), unit vectors per token
        return tokens.transpose(1, 2) @ tokens  # (B, N, N)

    return F.relu((similarity(z) - similarity(features)).abs() - margin).mean()


class VFLoss:
    """The VF loss of a VAE latent against a frozen foundation encoder, with its learned projection.

    ``foundation_encoder`` maps images in [-1, 1] to feature grids (B, D, h, w) on the latent's grid (a
    :class:`~aligntok.models.encoders.FoundationEncoder` built for the tokenizer's stride; with
    ``preprocess: vavae`` its ``patch_size`` and ``encode_pixels`` are used). It is frozen and
    put in eval mode here; pass one built for this loss, not a module that trains elsewhere.
    """

    def __init__(self, cfg: VFLossConfig | None, *, foundation_encoder: nn.Module, latent_channels: int) -> None:
        cfg = cfg or VFLossConfig()
        cfg.validate()
        width = getattr(foundation_encoder, "hidden_size", None)
        if not isinstance(width, int) or width <= 0 or latent_channels <= 0:
            raise ValueError(
                f"need the foundation encoder's hidden_size and a positive latent_channels, got {width!r} and "
                f"{latent_channels}"
            )
        self.config = cfg
        self.frozen_encoder = foundation_encoder.requires_grad_(False).eval()
        # VA-VAE's "reverse projection": latent -> foundation width, so the latent itself stays low-dimensional.
        self.projection = nn.Conv2d(latent_channels, width, kernel_size=1, bias=False)

    def to(self, *args, **kwargs) -> VFLoss:
        """Move the frozen encoder and the projection (same arguments as ``nn.Module.to``)."""
        self.frozen_encoder.to(*args, **kwargs)
        self.projection.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def reference(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The frozen foundation features of images ``x`` (in [-1, 1]) on a ``grid`` of tokens (B, D, h, w)."""
        if self.config.preprocess == "encoder":
            return self.frozen_encoder(x, grid)
        size = (grid[0] * self.frozen_encoder.patch_size, grid[1] * self.frozen_encoder.patch_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # VA-VAE: no antialiasing
        return self.frozen_encoder.encode_pixels(x, grid)

    def __call__(
        self, x: torch.Tensor, z: torch.Tensor, nll: torch.Tensor, encoder_last_layer: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``w * (cos_weight * L_mcos + distmat_weight * L_mdms)`` for images ``x`` and their latent ``z``.

        ``nll`` (the L1 + LPIPS term, mean-reduced, with its graph: :meth:`ReconstructionLoss.nll_loss`)
        and ``encoder_last_layer`` give the adaptive weight ``w`` (in VA-VAE's units, see the module
        docstring); outside training (no gradient) the adaptive weight is 0, as for the GAN term.
        """
        cfg = self.config
        features = self.reference(x, (z.shape[-2], z.shape[-1]))
        with torch.autocast(device_type=z.device.type, enabled=False):
            projected = self.projection(z.float())  # fp32 weights, as the trainer keeps them
            mcos = marginal_cosine_loss(projected, features.float(), cfg.cos_margin)
            mdms = marginal_distance_matrix_loss(projected, features.float(), cfg.distmat_margin)
            vf = cfg.cos_weight * mcos + cfg.distmat_weight * mdms
            if cfg.adaptive:
                weight = cfg.weight * adaptive_gan_weight(
                    nll, vf, encoder_last_layer, cfg.adaptive_max, nll_scale=x[0].numel()
                )
            else:
                weight = vf.new_tensor(cfg.weight)
            total = weight * vf
        logs = {"vf_mcos": mcos, "vf_mdms": mdms, "vf_loss": vf, "vf_w": weight, "vf_total": total}
        return total, {k: v.detach() for k, v in logs.items()}
