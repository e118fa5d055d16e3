"""Reconstruction loss of every tokenizer stage: L1 + LPIPS + an adaptively weighted PatchGAN term.

The generator side follows latent diffusion: ``nll = l1_weight * L1 + lpips_weight * LPIPS`` and, once
``step >= gan_start``, ``+ w_adaptive * gan_weight * (-D(recon)).mean()`` where ``w_adaptive`` balances the
two terms' gradient norms at the decoder's last layer. The discriminator side is the hinge loss. All loss
maths runs in fp32 with autocast disabled, whatever precision the models ran in.

Units. LDM's ``LPIPSWithDiscriminator`` (and VA-VAE's copy of it) sums its nll over each image's C*H*W
values and averages over the batch only; ours averages over all values, so it is the reference's nll
divided by ``N = C*H*W``. The adaptive weight is therefore computed in the reference's units (``N`` times
our nll's gradient) and clamped there at ``adaptive_max`` (LDM: 1e4), then divided by ``N``: our total is
exactly the reference's generator loss divided by ``N``, and the clamp binds where the reference's does
(at 256 px, ``N = 196,608`` and the clamp caps our weight at about 0.05).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import lpips
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

from aligntok.config import ConfigError, check_choice
from aligntok.models.discriminator import DiscriminatorConfig, PatchDiscriminator

LPIPS_BACKBONE_WEIGHTS = {
    "vgg": VGG16_Weights.IMAGENET1K_V1,
    "alex": AlexNet_Weights.IMAGENET1K_V1,
    "squeeze": SqueezeNet1_1_Weights.IMAGENET1K_V1,
}
ADAPTIVE_EPS = 1e-4  # keeps the adaptive weight finite when the GAN gradient vanishes (as in LDM)


class LpipsWeightsMissingError(ValueError):
    """LPIPS's ImageNet backbone weights are not cached and cannot be downloaded. One-line message."""


@dataclasses.dataclass
class ReconLossConfig:
    """Weights and schedule of the reconstruction loss, and the discriminator it trains."""

    l1_weight: float = 1.0  #: weight of the pixel L1 term
    lpips_weight: float = 1.0  #: weight of the LPIPS term (paper: 1.0)
    lpips_net: str = "vgg"  #: LPIPS backbone: vgg | alex | squeeze
    lpips_pretrained_backbone: bool = True  #: False = random backbone features (offline tests only; not a real LPIPS)
    gan_weight: float = 0.5  #: base weight of the generator's GAN term (VA-VAE / LDM: 0.5)
    #: step at which the GAN terms switch on (VA-VAE's disc_start 5001 counts two Lightning steps per batch)
    gan_start: int = 2500
    adaptive_weight: bool = True  #: scale the GAN term by ||grad nll|| / ||grad gan|| at the decoder's last layer
    adaptive_max: float = 1e4  #: upper clamp of the adaptive weight in LDM's units (nll summed over C*H*W; LDM: 1e4)
    discriminator: DiscriminatorConfig = dataclasses.field(default_factory=DiscriminatorConfig)  #: PatchGAN settings

    def validate(self) -> None:
        self.discriminator.validate()
        check_choice("lpips_net", self.lpips_net, tuple(LPIPS_BACKBONE_WEIGHTS))
        if min(self.l1_weight, self.lpips_weight, self.gan_weight) < 0:
            raise ConfigError("l1_weight, lpips_weight and gan_weight must be >= 0")
        if self.gan_start < 0 or self.adaptive_max <= 0:
            raise ConfigError("gan_start must be >= 0 and adaptive_max > 0")


def lpips_backbone_file(net: str) -> Path:
    """Where torchvision keeps (or would download) the ImageNet weights of LPIPS's ``net`` backbone."""
    url = LPIPS_BACKBONE_WEIGHTS[net].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def build_lpips(net: str = "vgg", *, pretrained_backbone: bool = True) -> nn.Module:
    """A frozen LPIPS module in eval mode (its calibrated linear heads ship with the lpips package)."""
    check_choice("lpips_net", net, tuple(LPIPS_BACKBONE_WEIGHTS))
    cached = lpips_backbone_file(net)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lpips passes torchvision's deprecated `pretrained=` argument
            module = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained_backbone, verbose=False)
    except OSError:  # torchvision's download failed: no network and nothing cached
        if not pretrained_backbone or cached.is_file():
            raise
        raise LpipsWeightsMissingError(
            f"LPIPS needs torchvision's ImageNet {net} weights {cached.name}, absent from {cached.parent} and not "
            f"downloadable: copy that file there from a machine with internet (the folder follows "
            f"TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}), or set lpips_pretrained_backbone=false"
        ) from None
    return module.eval().requires_grad_(False)


def adaptive_gan_weight(
    nll: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    *,
    nll_scale: float = 1.0,
) -> torch.Tensor:
    """The weight ``w`` of ``gan_loss`` that balances it against ``nll`` at ``last_layer``, detached.

    In the reference's units (LDM's ``calculate_adaptive_weight``, where the nll is ``nll_scale`` times
    ours): ``d = clamp(||grad(nll_scale * nll)|| / (||grad gan_loss|| + 1e-4), 0, max_weight)``, and
    ``w = d / nll_scale``, so that ``nll + w * gan_loss`` is the reference's ``nll_scale * nll + d * gan_loss``
    divided by ``nll_scale``. ``nll_scale=1`` is the formula on the losses as given.

    Returns 0 when no gradient can be taken (grad mode off or a frozen last layer, e.g. in evaluation).
    """
    if nll_scale <= 0:
        raise ValueError(f"nll_scale must be > 0, got {nll_scale}")
    if not (torch.is_grad_enabled() and last_layer.requires_grad and nll.requires_grad and gan_loss.requires_grad):
        return torch.zeros((), device=nll.device)
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    reference = nll_scale * nll_grad.float().norm() / (gan_grad.float().norm() + ADAPTIVE_EPS)
    return (reference.clamp(0.0, max_weight) / nll_scale).detach()


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))`` (LDM's scaling)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class ReconstructionLoss(nn.Module):
    """Owns the frozen LPIPS network and the discriminator; computes both sides of the GAN game.

    Checkpoint ``loss.discriminator`` (its weights and its optimizer), not this whole module: the LPIPS
    weights are frozen and rebuilt from the lpips/torchvision files at construction.
    """

    def __init__(self, cfg: ReconLossConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ReconLossConfig()
        cfg.validate()
        self.config = cfg
        # Without an LPIPS term no LPIPS network is needed (nor its weights, which may not be downloadable).
        self.lpips = (
            build_lpips(cfg.lpips_net, pretrained_backbone=cfg.lpips_pretrained_backbone) if cfg.lpips_weight > 0 else None
        )
        self.discriminator = PatchDiscriminator(cfg.discriminator)

    def train(self, mode: bool = True) -> ReconstructionLoss:
        super().train(mode)
        if self.lpips is not None:
            self.lpips.eval()  # LPIPS has dropout in its heads; it is a fixed metric, never trained
        return self

    def gan_active(self, step: int) -> bool:
        return self.config.gan_weight > 0 and step >= self.config.gan_start

    def nll_loss(self, x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``l1_weight * L1 + lpips_weight * LPIPS``, both means over all values (fp32, with its graph)."""
        if x.shape != recon.shape:
            raise ValueError(f"images {tuple(x.shape)} and reconstructions {tuple(recon.shape)} differ in shape")
        cfg = self.config
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, recon = x.float(), recon.float()
            l1 = (recon - x).abs().mean()
            perceptual = self.lpips(recon, x).mean() if cfg.lpips_weight > 0 else l1.new_zeros(())
            nll = cfg.l1_weight * l1 + cfg.lpips_weight * perceptual
        return nll, {"l1": l1.detach(), "lpips": perceptual.detach(), "nll": nll.detach()}

    def generator_loss(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        step: int,
        last_layer: torch.Tensor,
        *,
        nll: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for the tokenizer. Leaves no gradient on the discriminator's parameters.

        ``nll``: this batch's :meth:`nll_loss` when the caller already has it (it is then not recomputed).
        Logs: ``adaptive_w`` (the balancing weight in our units), ``gan_w`` (the effective weight of
        ``gan_g`` in the total: ``adaptive_w * gan_weight``) and ``d_weight`` (the same in LDM's units, as
        its logs show it: ``gan_w * C*H*W``).
        """
        cfg = self.config
        nll_value, logs = nll if nll is not None else self.nll_loss(x, recon)
        per_image = x[0].numel()  # LDM's nll sums over these C*H*W values
        with torch.autocast(device_type=x.device.type, enabled=False):
            gan_g, weight = nll_value.new_zeros(()), nll_value.new_zeros(())
            if self.gan_active(step):
                # The discriminator's parameters enter as constants: only the tokenizer learns from this term.
                frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
                gan_g = -functional_call(self.discriminator, frozen, (recon.float(),)).mean()
                weight = (
                    adaptive_gan_weight(nll_value, gan_g, last_layer, cfg.adaptive_max, nll_scale=per_image)
                    if cfg.adaptive_weight
                    else nll_value.new_ones(())
                )
            gan_w = weight * cfg.gan_weight
            total = nll_value + gan_w * gan_g
        logs = {**logs, "gan_g": gan_g, "adaptive_w": weight, "gan_w": gan_w, "d_weight": gan_w * per_image,
                "rec_total": total}
        return total, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Hinge loss for the discriminator on real ``x`` and detached ``recon``; None before ``gan_start``."""
        if not self.gan_active(step):
            return None
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits_real = self.discriminator(x.detach().float())
            logits_fake = self.discriminator(recon.detach().float())
            total = hinge_discriminator_loss(logits_real, logits_fake)
        logs = {"d_loss": total, "d_real": logits_real.mean(), "d_fake": logits_fake.mean()}
        return total, {k: v.detach() for k, v in logs.items()}
