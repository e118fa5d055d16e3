"""PSNR / SSIM / LPIPS against independent computations, and the streaming ReconMetrics with rFID."""

from __future__ import annotations

import math
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from scipy.ndimage import gaussian_filter
from torch import nn

from aligntok.eval import (
    FeatureStats,
    LPIPSMetric,
    ReconMetrics,
    WeightsNotFoundError,
    extract_features,
    frechet_distance,
    from_uint8,
    load_module_features,
    psnr,
    ssim,
)
from aligntok.eval.images import PixelScaleWarning
from aligntok.eval.recon import PSNR_MAX_DB


def _uint8_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _noisy(images: torch.Tensor, amplitude: int, seed: int = 1) -> torch.Tensor:
    noise = torch.randint(-amplitude, amplitude + 1, images.shape, generator=torch.Generator().manual_seed(seed))
    return (images.int() + noise).clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------ PSNR


def test_psnr_of_identical_images_is_the_cap_or_inf_uncapped():
    images = _uint8_images(3)
    assert psnr(images, images).tolist() == [PSNR_MAX_DB] * 3 and PSNR_MAX_DB == 100.0
    assert torch.isinf(psnr(images, images, max_db=None)).all()


def test_one_exact_reconstruction_leaves_the_dataset_psnr_finite_and_is_counted():
    originals = _uint8_images(4, seed=7)
    reconstructions = _noisy(originals, 10, seed=8)
    reconstructions[0] = originals[0]
    metrics = ReconMetrics()
    metrics.update(originals, reconstructions)
    result = metrics.compute()
    others = psnr(originals[1:], reconstructions[1:], max_db=None)
    assert result["psnr"] == pytest.approx((100.0 + others.sum().item()) / 4, rel=1e-12)
    assert result["num_exact_images"] == 1


@pytest.mark.parametrize("scale", ["0-255", "0-1"])
def test_floats_on_the_wrong_scale_are_refused_or_warned_about(scale, tiny_features):
    # The same pair on three scales: [-1, 1] is right; [0, 255] is refused, [0, 1] warned about.
    originals = _uint8_images(2, seed=9)
    reconstructions = _noisy(originals, 6, seed=10)
    right = psnr(from_uint8(originals), from_uint8(reconstructions))
    assert torch.equal(right, psnr(originals, reconstructions))
    a, b = originals.double(), reconstructions.double()
    if scale == "0-255":
        for call in (lambda: psnr(a, b), lambda: ssim(a, b), lambda: ReconMetrics().update(a, b),
                     lambda: psnr(from_uint8(originals), b)):
            with pytest.raises(ValueError, match=r"\[0, 255\] pixels|outside \[-1, 1\]") as caught:
                call()
            assert "\n" not in str(caught.value)
        with pytest.raises(ValueError, match=r"\[0, 255\] pixels"):  # FID / IS features too
            extract_features(tiny_features, a.float())
    else:
        with pytest.warns(PixelScaleWarning, match=r"looks like \[0, 1\] pixels"):
            psnr(a / 255, b / 255)


def test_model_outputs_may_overshoot_and_are_clamped():
    originals = _uint8_images(2, seed=11)
    overshoot = from_uint8(originals) * 1.2  # a decoder's output beyond [-1, 1] is clamped, not refused
    assert torch.isfinite(psnr(from_uint8(originals), overshoot)).all()


def test_psnr_of_a_known_error_is_analytic():
    original = torch.full((2, 3, 16, 16), 100, dtype=torch.uint8)
    signs = (torch.arange(16 * 16).view(16, 16) % 2) * 2 - 1  # +5 / -5 everywhere: MSE = 25
    reconstruction = (original.int() + 5 * signs).to(torch.uint8)
    expected = 10 * math.log10(255**2 / 25)
    assert psnr(original, reconstruction).tolist() == pytest.approx([expected, expected], abs=1e-12)


def test_psnr_quantises_float_inputs_like_saved_pngs():
    original, reconstruction = _uint8_images(2), _noisy(_uint8_images(2), 10)
    as_float = psnr(from_uint8(original), from_uint8(reconstruction) + 0.4 / 127.5)  # rounds back
    assert torch.equal(as_float, psnr(original, reconstruction))
    mse = (original.double() - reconstruction.double()).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(as_float, 10 * torch.log10(255.0**2 / mse))


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(_uint8_images(1, 16), _uint8_images(1, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ssim(torch.zeros(3, 16, 16, dtype=torch.uint8), torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(_uint8_images(1, 8), _uint8_images(1, 8))


# ------------------------------------------------------------------------------------------ SSIM


def _reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 written out with scipy: 11-tap Gaussian (sigma 1.5), valid region, channel mean."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(z):  # truncate 3.5 sigma -> radius 5 -> 11 taps; crop to the valid region
        return gaussian_filter(z, 1.5, truncate=3.5, mode="constant")[5:-5, 5:-5]

    values = []
    for xc, yc in zip(x.astype(np.float64), y.astype(np.float64), strict=True):
        mx, my = blur(xc), blur(yc)
        vx, vy, cxy = blur(xc * xc) - mx**2, blur(yc * yc) - my**2, blur(xc * yc) - mx * my
        values.append((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())
    return float(np.mean(values))


def test_ssim_of_identical_images_is_one():
    images = _uint8_images(2)
    assert ssim(images, images).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def test_ssim_matches_an_independent_implementation():
    original, reconstruction = _uint8_images(3), _noisy(_uint8_images(3), 40)
    ours = ssim(original, reconstruction)
    expected = [_reference_ssim(a.numpy(), b.numpy()) for a, b in zip(original, reconstruction, strict=True)]
    assert ours.tolist() == pytest.approx(expected, abs=1e-7)
    assert all(0.2 < value < 0.99 for value in expected)  # a case where the border convention matters


# ------------------------------------------------------------------------------------------ LPIPS

_LPIPS_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
_LPIPS_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
_ALEX_RELUS = (1, 4, 7, 9, 11)  # torchvision alexnet.features indices whose outputs LPIPS compares


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory) -> Path:
    """A randomly initialised torchvision AlexNet trunk saved in torchvision's key layout."""
    torch.manual_seed(123)
    features = torchvision.models.alexnet().features
    path = tmp_path_factory.mktemp("lpips") / "alexnet-random.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}, str(path))
    return path


def _alexnet_trunk(path: Path) -> nn.Module:
    """A fresh AlexNet trunk holding the weights of ``path`` (each test builds its own module)."""
    features = torchvision.models.alexnet().features.eval()
    features.load_state_dict({k.removeprefix("features."): v for k, v in load_file(str(path)).items()})
    return features


def _reference_lpips(features: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS written out: scaled input, unit-normalised activations, learned 1x1 heads, spatial mean."""
    heads = torch.load(Path(lpips.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu", weights_only=True)

    def activations(x):
        x = (from_uint8(x) - _LPIPS_SHIFT) / _LPIPS_SCALE
        out = []
        for index, layer in enumerate(features):
            x = layer(x)
            if index in _ALEX_RELUS:
                out.append(x.clone())
        return out

    total = torch.zeros(a.shape[0])
    with torch.no_grad():
        for level, (fa, fb) in enumerate(zip(activations(a), activations(b), strict=True)):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            weight = heads[f"lin{level}.model.1.weight"]
            total += torch.nn.functional.conv2d((na - nb) ** 2, weight).mean(dim=(1, 2, 3))
    return total


def test_lpips_with_a_trunk_file_matches_an_independent_computation(alexnet_file):
    path = alexnet_file
    features = _alexnet_trunk(path)
    metric = LPIPSMetric("alex", backbone_weights=path)
    original, reconstruction = _uint8_images(2, 64), _noisy(_uint8_images(2, 64), 30)
    ours = metric(original, reconstruction)
    assert ours.shape == (2,)
    assert torch.allclose(ours, _reference_lpips(features, original, reconstruction), rtol=1e-4, atol=1e-7)
    assert (ours > 0).all()
    assert metric(original, original).abs().max() == 0.0
    info = metric.describe()
    assert info["pretrained_backbone"] and info["weights"] == str(path) and len(info["weights_sha256"]) == 64


def test_lpips_random_vgg_trunk_is_reproducible():
    original, reconstruction = _uint8_images(2), _noisy(_uint8_images(2), 30)
    metric = LPIPSMetric("vgg", pretrained_backbone=False)
    first = metric(original, reconstruction)
    second = LPIPSMetric("vgg", pretrained_backbone=False)(from_uint8(original), from_uint8(reconstruction))
    assert torch.equal(first, second) and (first > 0).all()
    assert metric.describe()["pretrained_backbone"] is False


def test_lpips_missing_trunk_weights_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch.hub cache
    with pytest.raises(WeightsNotFoundError, match="vgg16-397923af.pth") as info:
        LPIPSMetric("vgg", allow_download=False)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and "https://download.pytorch.org" in message
    with pytest.raises(ValueError, match="is not one of vgg, alex"):
        LPIPSMetric("squeeze", pretrained_backbone=False)


def test_lpips_rejects_a_trunk_file_of_another_network(tmp_path):
    save_file({"features.0.weight": torch.zeros(2, 3, 3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no 'features.0.bias'|do not fit"):
        LPIPSMetric("alex", backbone_weights=tmp_path / "other.safetensors")


# ----------------------------------------------------------------------------------- ReconMetrics


class TinyFeatureNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.fixture()
def tiny_features(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_file(TinyFeatureNet().state_dict(), str(path))
    return load_module_features(TinyFeatureNet(), path, name="tiny")


def test_recon_metrics_stream_to_the_batch_formulas(tiny_features):
    originals = _uint8_images(12, seed=3)
    reconstructions = _noisy(originals, 25, seed=4)
    metrics = ReconMetrics(lpips=LPIPSMetric("alex", pretrained_backbone=False), inception=tiny_features)
    for start in (0, 5):  # uneven batches, float inputs for one of them
        end = 5 if start == 0 else 12
        metrics.update(from_uint8(originals[start:end]), reconstructions[start:end])
    result = metrics.compute()
    assert result["num_images"] == 12
    assert result["psnr"] == pytest.approx(psnr(originals, reconstructions).mean().item(), rel=1e-12)
    assert result["ssim"] == pytest.approx(ssim(originals, reconstructions).mean().item(), rel=1e-12)
    lpips_all = LPIPSMetric("alex", pretrained_backbone=False)(originals, reconstructions)
    assert result["lpips"] == pytest.approx(lpips_all.double().mean().item(), rel=1e-5)
    feats_a = extract_features(tiny_features, originals)["pool"].double().numpy()
    feats_b = extract_features(tiny_features, reconstructions)["pool"].double().numpy()
    expected = frechet_distance(
        feats_a.mean(0), np.cov(feats_a, rowvar=False), feats_b.mean(0), np.cov(feats_b, rowvar=False)
    )
    assert result["rfid"] == pytest.approx(expected, rel=1e-8) and result["rfid"] > 0
    assert [n["name"] for n in metrics.networks()] == ["tiny", "lpips-alex-v0.1"]


def test_recon_metrics_of_perfect_reconstructions(tiny_features):
    images = _uint8_images(10, seed=5)
    metrics = ReconMetrics(inception=tiny_features)
    metrics.update(images, images)
    result = metrics.compute()
    assert result["psnr"] == PSNR_MAX_DB and result["num_exact_images"] == 10
    assert result["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert result["lpips"] is None and result["rfid"] == pytest.approx(0.0, abs=1e-9)


def test_recon_metrics_without_images_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        ReconMetrics().compute()
    assert isinstance(FeatureStats(), FeatureStats)
