"""Tokenizer losses: L1 + LPIPS + adaptive GAN, hinge discriminator loss, semantic preservation."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision.models._api
from torch import nn

from aligntok.config import ConfigError
from aligntok.losses import (
    LpipsWeightsMissingError,
    ReconLossConfig,
    ReconstructionLoss,
    SemanticLossConfig,
    SemanticPreservationLoss,
    adaptive_gan_weight,
    hinge_discriminator_loss,
)
from aligntok.models.decoder import DecoderConfig
from aligntok.models.discriminator import DiscriminatorConfig
from aligntok.models.encoders import RandomEncoderConfig
from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig


def recon_config(**overrides) -> ReconLossConfig:
    # SqueezeNet LPIPS with a random backbone: small, and needs no torchvision download.
    cfg = ReconLossConfig(
        lpips_net="squeeze",
        lpips_pretrained_backbone=False,
        gan_start=10,
        discriminator=DiscriminatorConfig(base_channels=8, norm_groups=4),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class LastLayerToy(nn.Module):
    """recon = conv(x): a one-layer 'decoder' whose weight plays the decoder's last layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.fixture
def loss() -> ReconstructionLoss:
    """A fresh loss per test: tests swap its discriminator and switch its modes (never share a module)."""
    torch.manual_seed(0)
    return ReconstructionLoss(recon_config())


# ------------------------------------------------------------------------------------------ adaptive weight


def test_adaptive_weight_hand_checked():
    last = torch.tensor([1.0, -2.0], requires_grad=True)
    nll = (last * torch.tensor([3.0, 4.0])).sum()  # gradient (3, 4): norm 5
    gan = (last * torch.tensor([0.0, 2.0])).sum()  # gradient (0, 2): norm 2
    assert adaptive_gan_weight(nll, gan, last).item() == pytest.approx(5.0 / (2.0 + 1e-4))
    assert not adaptive_gan_weight(nll, gan, last).requires_grad
    flat = (last * 0.0).sum()  # vanishing GAN gradient: 5 / 1e-4 = 5e4, clamped
    assert adaptive_gan_weight(nll, flat, last, max_weight=1e4).item() == pytest.approx(1e4)
    with torch.no_grad():  # evaluation: nothing to differentiate
        assert adaptive_gan_weight(last.sum(), last.sum(), last).item() == 0.0


def test_adaptive_weight_is_clamped_in_the_references_units():
    """The reference's nll is nll_scale times ours: its ratio is 1000 * 5 / 2.0001 = 2499.9 (< 1e4, so
    ours is that / 1000), and 10000 * 5 / 2.0001 = 24999 (clamped to 1e4, so ours is 1e4 / 10000 = 1)."""
    last = torch.tensor([1.0, -2.0], requires_grad=True)
    nll = (last * torch.tensor([3.0, 4.0])).sum()
    gan = (last * torch.tensor([0.0, 2.0])).sum()
    assert adaptive_gan_weight(nll, gan, last, 1e4, nll_scale=1000).item() == pytest.approx(5.0 / 2.0001)
    assert adaptive_gan_weight(nll, gan, last, 1e4, nll_scale=10_000).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="nll_scale"):
        adaptive_gan_weight(nll, gan, last, nll_scale=0)


def test_hinge_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # real: relu(1-2)=0, relu(0.5)=0.5 -> 0.25; fake: relu(-1)=0, relu(1.5)=1.5 -> 0.75
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))


# ----------------------------------------------------------------------------------- reconstruction loss


def test_identical_images_cost_nothing(loss):
    x = images()
    total, logs = loss.generator_loss(x, x.clone(), step=0, last_layer=torch.zeros(1, requires_grad=True))
    assert total.item() == 0.0 and logs["l1"].item() == 0.0 and logs["lpips"].item() == pytest.approx(0.0, abs=1e-6)


def test_no_gan_before_gan_start(loss):
    toy = LastLayerToy()
    x = images()
    recon = toy(x)
    total, logs = loss.generator_loss(x, recon, step=9, last_layer=toy.conv.weight)
    assert logs["gan_g"].item() == 0.0 and logs["adaptive_w"].item() == 0.0
    assert total.item() == pytest.approx(logs["l1"].item() + logs["lpips"].item(), rel=1e-6)
    assert logs["lpips"].item() > 0
    assert loss.discriminator_loss(x, recon, step=9) is None
    assert loss.discriminator_loss(x, recon, step=10) is not None


def test_gan_term_after_gan_start(loss):
    toy = LastLayerToy()
    x = images()
    recon = toy(x)
    total, logs = loss.generator_loss(x, recon, step=10, last_layer=toy.conv.weight)
    # Recompute the documented formula independently (clamped at 1e4 in units of C*H*W = 3072 times ours).
    l1 = (recon - x).abs().mean()
    nll = l1 + loss.lpips(recon, x).mean()
    gan = -loss.discriminator(recon).mean()
    ratio = torch.autograd.grad(nll, toy.conv.weight, retain_graph=True)[0].norm() / (
        torch.autograd.grad(gan, toy.conv.weight, retain_graph=True)[0].norm() + 1e-4
    )
    weight = ratio.clamp(max=1e4 / 3072)
    assert logs["gan_g"].item() == pytest.approx(gan.item(), rel=1e-5)
    assert logs["adaptive_w"].item() == pytest.approx(weight.item(), rel=1e-4)
    assert logs["gan_w"].item() == pytest.approx(0.5 * weight.item(), rel=1e-4)
    assert total.item() == pytest.approx((nll + weight * 0.5 * gan).item(), rel=1e-5)
    loss.discriminator.zero_grad()
    total.backward()
    assert toy.conv.weight.grad is not None
    assert all(p.grad is None for p in loss.discriminator.parameters())  # the generator step leaves D alone
    assert all(p.grad is None for p in loss.lpips.parameters())


class ScaledCritic(nn.Module):
    """A critic whose logits are ``scale`` times the mean pixel: a small scale makes its gradient tiny."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.mean(dim=(1, 2, 3), keepdim=True)


@pytest.mark.parametrize("critic_scale, clamped", [(None, False), (1e-4, True)])
def test_generator_loss_is_ldms_divided_by_the_values_per_image(loss, critic_scale, clamped):
    """LDM's LPIPSWithDiscriminator (logvar 0, disc_factor 1), written out: nll summed over C*H*W and
    averaged over the batch, d_weight clamped at 1e4 in those units, times disc_weight 0.5. Ours equals
    it divided by C*H*W: the same total, the same gradient, whether or not the clamp binds."""
    if critic_scale is not None:
        loss.discriminator = ScaledCritic(critic_scale)  # a fresh loss per test: nothing shared changes
    toy = LastLayerToy()
    x = images(size=32)
    recon = toy(x)
    per_image = 3 * 32 * 32
    total, logs = loss.generator_loss(x, recon, step=10, last_layer=toy.conv.weight)

    rec = (x - recon).abs() + loss.lpips(x, recon)  # (B, 3, H, W) + (B, 1, 1, 1), as LDM broadcasts it
    nll_ref = rec.sum() / rec.shape[0]
    g_loss = -loss.discriminator(recon).mean()
    nll_grad = torch.autograd.grad(nll_ref, toy.conv.weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, toy.conv.weight, retain_graph=True)[0]
    raw = nll_grad.norm() / (g_grad.norm() + 1e-4)
    assert (raw.item() > 1e4) == clamped
    d_weight = torch.clamp(raw, 0.0, 1e4).detach() * 0.5
    reference = nll_ref + d_weight * g_loss

    assert logs["d_weight"].item() == pytest.approx(d_weight.item(), rel=1e-4)
    assert logs["gan_w"].item() == pytest.approx(d_weight.item() / per_image, rel=1e-4)
    assert (total * per_image).item() == pytest.approx(reference.item(), rel=1e-5)
    ours = torch.autograd.grad(total * per_image, toy.conv.weight, retain_graph=True)[0]
    theirs = torch.autograd.grad(reference, toy.conv.weight)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_fixed_gan_weight_when_not_adaptive():
    torch.manual_seed(0)
    fixed = ReconstructionLoss(recon_config(adaptive_weight=False, gan_weight=0.25))
    x, recon = images(), images(seed=1)
    total, logs = fixed.generator_loss(x, recon, step=10, last_layer=torch.zeros(1))
    assert logs["adaptive_w"].item() == 1.0 and logs["gan_w"].item() == 0.25
    assert total.item() == pytest.approx((logs["nll"] + 0.25 * logs["gan_g"]).item(), rel=1e-6)


def test_discriminator_hinge_through_the_module(loss, monkeypatch):
    # A stand-in critic whose logit is the mean pixel value makes the hinge loss checkable by hand.
    monkeypatch.setattr(loss, "discriminator", MeanCritic())
    x, recon = torch.full((2, 3, 32, 32), 0.9), torch.full((2, 3, 32, 32), -0.5, requires_grad=True)
    total, logs = loss.discriminator_loss(x, recon, step=10)
    # real: relu(1 - 0.9) = 0.1; fake: relu(1 - 0.5) = 0.5
    assert total.item() == pytest.approx(0.5 * (0.1 + 0.5))
    assert logs["d_real"].item() == pytest.approx(0.9) and logs["d_fake"].item() == pytest.approx(-0.5)
    total.backward()
    assert recon.grad is None  # reconstructions are detached for the discriminator step


class MeanCritic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.mean(dim=(1, 2, 3), keepdim=True)


def test_loss_maths_in_fp32_under_autocast(loss):
    toy = LastLayerToy()
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon = toy(x)
        assert recon.dtype == torch.bfloat16
        total, logs = loss.generator_loss(x, recon, step=10, last_layer=toy.conv.weight)
        d_total, _ = loss.discriminator_loss(x, recon, step=10)
    assert total.dtype == torch.float32 and d_total.dtype == torch.float32 and logs["lpips"].dtype == torch.float32


def test_lpips_stays_frozen_in_eval(loss):
    loss.train()
    assert not loss.lpips.training and loss.discriminator.training
    assert not any(p.requires_grad for p in loss.lpips.parameters())


def test_missing_lpips_backbone_weights_are_a_one_line_error(tmp_path, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(LpipsWeightsMissingError) as err:
        ReconstructionLoss(recon_config(lpips_pretrained_backbone=True))
    message = str(err.value)
    assert "squeezenet1_1-b8a52dc0.pth" in message and f"TORCH_HOME={tmp_path}" in message
    assert "lpips_pretrained_backbone=false" in message and "\n" not in message


def test_recon_config_errors(loss):
    with pytest.raises(ConfigError, match="lpips_net='resnet'"):
        ReconLossConfig(lpips_net="resnet").validate()
    with pytest.raises(ConfigError, match="gan_start"):
        ReconLossConfig(gan_start=-1).validate()
    with pytest.raises(ValueError, match="differ in shape"):
        loss.generator_loss(images(), images(size=16), 0, torch.zeros(1))


# -------------------------------------------------------------------------------- semantic preservation


def tiny_tokenizer() -> AlignTokTokenizer:
    torch.manual_seed(0)
    cfg = TokenizerConfig(
        encoder="random",
        random_encoder=RandomEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, patch_size=4, image_size=16),
        latent_channels=8,
        adapter_hidden=16,
        decoder=DecoderConfig(base_channels=16, channel_mult=[1, 2, 2], layers_per_block=1, norm_groups=8),
    )
    return AlignTokTokenizer.from_config(cfg)


def drift(module: nn.Module, scale: float) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("where", ["post", "pre"])
def test_semantic_loss_zero_then_growing_with_drift(kind, where):
    tok = tiny_tokenizer()
    semantic = SemanticPreservationLoss(
        SemanticLossConfig(weight=2.0, kind=kind, where=where), encoder=tok.encoder, adapter=tok.adapter
    )
    x = images(size=16)
    total, logs = semantic(x, *tok.features(x))
    assert total.item() == pytest.approx(0.0, abs=1e-6)

    values = []
    for step in (0.01, 0.05):
        drift(tok.encoder, step)
        total, logs = semantic(x, *tok.features(x))
        assert total.item() == pytest.approx(2.0 * logs[f"sp_{kind}"].item())
        values.append(total.item())
    assert 0 < values[0] < values[1]
    total.backward()  # gradients reach the trained encoder, not the frozen copy
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tok.encoder.parameters())
    assert all(p.grad is None and not p.requires_grad for p in semantic.frozen_encoder.parameters())


def test_semantic_copy_is_frozen_and_not_registered():
    tok = tiny_tokenizer()
    semantic = SemanticPreservationLoss(SemanticLossConfig(), encoder=tok.encoder, adapter=tok.adapter)
    assert not isinstance(semantic, nn.Module)
    assert not semantic.frozen_encoder.training and not semantic.frozen_adapter.training
    assert all(a is not b for a, b in zip(tok.encoder.parameters(), semantic.frozen_encoder.parameters()))
    state_before = {k: v.clone() for k, v in semantic.frozen_adapter.state_dict().items()}
    drift(tok.adapter, 0.1)  # training the live adapter leaves the copy untouched
    assert all(torch.equal(v, semantic.frozen_adapter.state_dict()[k]) for k, v in state_before.items())
    x = images(size=16)
    pre, post = tok.features(x)
    assert semantic(x, pre, post)[0].item() > 0  # the adapter drifted; post-adapter loss sees it
    with pytest.raises(ValueError, match="post-adapter features"):
        semantic(x, pre, None)
    with pytest.raises(ConfigError, match="where='middle'"):
        SemanticLossConfig(where="middle").validate()
