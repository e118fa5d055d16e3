"""evaluate_generation end to end with randomly initialised Inception / DINOv2 networks saved to disk.

Pretrained weights are never available here: the tests build torch-fidelity's Inception-V3 and a
tiny transformers DINOv2 with random weights, save them, and load them through the library's own
paths; expected numbers come from running those networks directly and independent formulas.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.interpolate_compat_tensorflow import (
    interpolate_bilinear_2d_like_tensorflow1x,
)
from torch_fidelity.metric_fid import fid_statistics_to_metric
from transformers import Dinov2Config, Dinov2Model

from aligntok.eval import (
    FD_DINOV2_BIAS_NOTE,
    WeightsNotFoundError,
    evaluate_generation,
    extract_features,
    load_dinov2,
    load_inception,
    load_module_features,
    open_images,
    save_npz,
    save_png_folder,
)
from aligntok.eval import generation as generation_module

NUM_IMAGES = 4  # > k=3 for precision/recall; each Inception forward costs ~0.5 s on one CPU thread at 299 px


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14
    )
    path = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2"
    Dinov2Model(config).save_pretrained(path)
    return path


@pytest.fixture
def image_sets():
    """Fresh arrays per test (cheap): a test may write into them."""
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, size=(NUM_IMAGES, 32, 32, 3), dtype=np.uint8)
    base = rng.integers(60, 200, size=(NUM_IMAGES, 1, 1, 3))
    references = np.clip(base + rng.integers(-40, 41, size=(NUM_IMAGES, 32, 32, 3)), 0, 255).astype(np.uint8)
    return samples, references


def _raw_inception(path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    net = tf_inception.FeatureExtractorInceptionV3(
        "raw", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
    )
    with torch.no_grad():
        pool, logits = net(torch.from_numpy(images).permute(0, 3, 1, 2))
    return pool.double().numpy(), logits.double().numpy()


def _is_numpy(logits: np.ndarray, split_size: int) -> float:
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    parts = [probs[start : start + split_size] for start in range(0, len(probs), split_size)]
    return float(np.mean([np.exp((p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()) for p in parts]))


def _pr_numpy(samples: np.ndarray, refs: np.ndarray, k: int = 3) -> tuple[float, float]:
    def radii(x):
        return np.sort(np.linalg.norm(x[:, None] - x[None], axis=-1), axis=1)[:, k]

    cross = np.linalg.norm(samples[:, None] - refs[None], axis=-1)
    return float((cross <= radii(refs)[None]).any(1).mean()), float((cross.T <= radii(samples)[None]).any(1).mean())


def test_evaluate_generation_matches_direct_computation(tmp_path, inception_file, dinov2_dir, image_sets):
    samples, references = image_sets
    sample_pool, sample_logits = _raw_inception(inception_file, samples)
    ref_pool, _ = _raw_inception(inception_file, references)
    mu_ref, sigma_ref = ref_pool.mean(0), np.cov(ref_pool, rowvar=False)
    # Samples as a PNG folder; the reference as an ADM batch with images and precomputed statistics.
    save_png_folder(samples, tmp_path / "samples")
    np.savez(tmp_path / "ref.npz", arr_0=references, mu=mu_ref, sigma=sigma_ref)

    result = evaluate_generation(
        tmp_path / "samples",
        tmp_path / "ref.npz",
        inception_weights=inception_file,
        dinov2=str(dinov2_dir),
        is_split_size=2,
        batch_size=3,
        device="cpu",
    )

    expected_fid = fid_statistics_to_metric(
        {"mu": sample_pool.mean(0), "sigma": np.cov(sample_pool, rowvar=False)},
        {"mu": mu_ref, "sigma": sigma_ref},
        False,
    )["frechet_inception_distance"]
    assert result["fid"] == pytest.approx(expected_fid, rel=1e-5) and result["fid"] > 0
    assert result["inception_score"] == pytest.approx(_is_numpy(sample_logits, 2), rel=1e-5)
    assert (result["precision"], result["recall"]) == pytest.approx(_pr_numpy(sample_pool, ref_pool), abs=1e-6)
    assert result["num_samples"] == NUM_IMAGES and result["num_reference_images"] == NUM_IMAGES

    # FD_DINOv2 from the tiny model run directly with the documented preprocessing.
    model = Dinov2Model.from_pretrained(dinov2_dir).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255

    def cls_tokens(images):
        x = interpolate_bilinear_2d_like_tensorflow1x(
            torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(224, 224), align_corners=False
        )
        with torch.no_grad():
            return model(pixel_values=(x - mean) / std).pooler_output.double().numpy()

    a, b = cls_tokens(samples), cls_tokens(references)
    expected_fd = fid_statistics_to_metric(
        {"mu": a.mean(0), "sigma": np.cov(a, rowvar=False)}, {"mu": b.mean(0), "sigma": np.cov(b, rowvar=False)}, False
    )["frechet_inception_distance"]
    assert result["fd_dinov2"] == pytest.approx(expected_fd, rel=1e-5)
    assert result["fd_dinov2_note"] == FD_DINOV2_BIAS_NOTE and "second opinion" in FD_DINOV2_BIAS_NOTE

    # Numerics and provenance: singular covariance warned, non-standard weights flagged, hashes recorded.
    assert any("singular" in w for w in result["warnings"])
    assert any("standard Inception weights" in w for w in result["warnings"])
    provenance = result["provenance"]
    inception_info = provenance["feature_networks"][0]
    assert inception_info["weights_sha256"] == hashlib.sha256(inception_file.read_bytes()).hexdigest()
    assert inception_info["standard_weights"] is False
    assert provenance["feature_networks"][1]["name"].startswith("dinov2:")
    assert provenance["reference"]["fid_statistics"].startswith("precomputed")
    assert provenance["reference"]["sha256"] == hashlib.sha256((tmp_path / "ref.npz").read_bytes()).hexdigest()
    assert provenance["settings"]["samples"]["kind"] == "folder" and provenance["num_samples"] == NUM_IMAGES
    assert provenance["software"]["torch-fidelity"] and provenance["settings"]["is_split_size"] == 2


class TinyFeatureNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x):
        return torch.tanh(self.conv(x))


@pytest.fixture()
def tiny_features(tmp_path):
    torch.manual_seed(1)
    save_file(TinyFeatureNet().state_dict(), str(tmp_path / "tiny.safetensors"))
    return load_module_features(TinyFeatureNet(), tmp_path / "tiny.safetensors", name="tiny")


def test_reference_statistics_without_images(tmp_path, tiny_features, image_sets, monkeypatch):
    samples, references = image_sets
    monkeypatch.setattr(generation_module, "DINOV2_DEFAULT", "aligntok-tests/no-such-model")
    save_npz(samples, tmp_path / "samples.npz")
    save_png_folder(references, tmp_path / "refs")
    computed = evaluate_generation(tmp_path / "samples.npz", tmp_path / "refs", inception=tiny_features, device="cpu")
    assert computed["provenance"]["reference"]["fid_statistics"] == "computed from reference images"
    assert computed["inception_score"] is None and computed["precision"] is not None
    assert "fd_dinov2" not in computed and computed["fd_dinov2_note"].startswith("fd_dinov2 not computed")

    ref_features = extract_features(tiny_features, references)["pool"].double().numpy()
    np.savez(tmp_path / "stats.npz", mu=ref_features.mean(0), sigma=np.cov(ref_features, rowvar=False))
    from_stats = evaluate_generation(
        tmp_path / "samples.npz", tmp_path / "stats.npz", inception=tiny_features, dinov2=None
    )
    assert from_stats["fid"] == pytest.approx(computed["fid"], rel=1e-9)
    assert from_stats["precision"] is None and from_stats["num_reference_images"] is None
    assert any("precision/recall not computed" in note for note in from_stats["notes"])

    np.savez(tmp_path / "wrong.npz", mu=np.zeros(7), sigma=np.eye(7))
    with pytest.raises(ValueError, match="reference statistics have 7 dims"):
        evaluate_generation(tmp_path / "samples.npz", tmp_path / "wrong.npz", inception=tiny_features, dinov2=None)


def test_missing_inception_weights_name_the_file_the_path_and_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError) as info:
        load_inception(allow_download=False)
    message = str(info.value)
    assert "\n" not in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message and str(tmp_path / "hub") in message
    assert "https://github.com/toshas/torch-fidelity/releases" in message and "--inception-weights" in message
    with pytest.raises(WeightsNotFoundError, match="nope.pth does not exist"):
        load_inception(tmp_path / "nope.pth")


def test_inception_weights_must_be_a_plain_state_dict(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(argparse.Namespace(payload=1), protocol=2))
    with pytest.raises(ValueError, match="not a loadable Inception state dict"):
        load_inception(path)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "small.pth")
    with pytest.raises(ValueError, match="do not fit torch-fidelity's Inception-V3"):
        load_inception(tmp_path / "small.pth")


def test_dinov2_loading_errors(tmp_path, dinov2_dir):
    with pytest.raises(WeightsNotFoundError, match="aligntok-tests/no-such-model") as info:
        load_dinov2("aligntok-tests/no-such-model", allow_download=False)
    assert "\n" not in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="no .safetensors"):
        load_dinov2(tmp_path / "empty")
    network = load_dinov2(dinov2_dir)
    features = extract_features(network, torch.zeros(2, 3, 20, 20, dtype=torch.uint8))["pool"]
    assert features.shape == (2, 32) and network.describe()["weights_sha256"]


def test_extract_features_accepts_every_image_form(tmp_path, tiny_features, image_sets):
    samples, _ = image_sets
    save_npz(samples, tmp_path / "s.npz")
    from_source = extract_features(tiny_features, open_images(tmp_path / "s.npz"), batch_size=2)["pool"]
    from_array = extract_features(tiny_features, samples)["pool"]
    as_float = torch.from_numpy(samples).permute(0, 3, 1, 2).float() / 127.5 - 1
    from_float = extract_features(tiny_features, as_float)["pool"]  # quantised back to the same pixels
    # Same pixels; only the batch size differs, which may change float rounding in the convolution.
    assert torch.allclose(from_source, from_array, atol=1e-6) and torch.equal(from_array, from_float)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(tiny_features, samples.astype(np.float32))
