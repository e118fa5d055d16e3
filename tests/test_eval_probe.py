"""Linear probe on pooled latents and CKNNA on planted structure, noise and invariances."""

from __future__ import annotations

import pytest
import torch

from aligntok.eval import (
    average_pool,
    cknna,
    evaluate_probe,
    linear_probe,
    split_train_test,
)


def _planted_latents(n: int, classes: int, seed: int, signal: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 8, 4, 4) latents whose spatial means carry a class code plus noise; labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    codes = torch.randn(classes, 8, generator=g)
    latents = torch.randn(n, 8, 4, 4, generator=g) + signal * codes[labels][:, :, None, None]
    return latents, labels


def test_average_pool_shapes():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    assert torch.equal(average_pool(x), x.mean(dim=(2, 3)))
    assert average_pool(torch.zeros(2, 5, 3)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        average_pool(torch.zeros(2))


def test_linear_probe_finds_planted_classes():
    latents, labels = _planted_latents(600, classes=5, seed=0, signal=1.0)
    result = linear_probe(*split_train_test(average_pool(latents), labels, 0.25, seed=0))
    assert result["accuracy"] > 0.95
    assert result["num_classes"] == 5 and result["num_train"] == 450 and result["num_test"] == 150


def test_linear_probe_is_at_chance_on_noise():
    g = torch.Generator().manual_seed(1)
    features, labels = torch.randn(800, 16, generator=g), torch.randint(0, 4, (800,), generator=g)
    result = linear_probe(*split_train_test(features, labels, 0.5, seed=1))
    # 400 test samples, chance 1/4: three standard deviations are about 0.065.
    assert abs(result["accuracy"] - 0.25) < 0.07
    assert result["chance"] == pytest.approx(0.25, abs=0.07)


def test_linear_probe_ignores_feature_scale_and_offset():
    latents, labels = _planted_latents(300, classes=3, seed=2, signal=0.6)
    features = average_pool(latents)
    split = split_train_test(features, labels, 0.3, seed=0)
    scaled = split_train_test(features * 1000.0 + 50.0, labels, 0.3, seed=0)  # standardisation undoes this
    assert linear_probe(*split)["accuracy"] == pytest.approx(linear_probe(*scaled)["accuracy"], abs=1e-9)


def test_linear_probe_counts_unseen_test_classes_as_wrong():
    train_x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    train_y = torch.tensor([0, 0, 1, 1])
    test_x, test_y = torch.tensor([[-1.5], [1.5], [1.5]]), torch.tensor([0, 1, 7])
    assert linear_probe(train_x, train_y, test_x, test_y)["accuracy"] == pytest.approx(2 / 3)


def test_linear_probe_bad_input_is_a_one_line_error():
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(
            torch.randn(4, 2), torch.zeros(4, dtype=torch.long), torch.randn(2, 2), torch.zeros(2, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="labels must be N=4 integers"):
        linear_probe(torch.randn(4, 2), torch.zeros(3), torch.randn(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="test_fraction"):
        split_train_test(torch.randn(4, 2), torch.arange(4), 1.5)


def test_cknna_of_identical_features_is_one():
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(3))
    assert cknna(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cknna_is_invariant_to_rotation_and_scale():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 16, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert cknna(x, 7.0 * (x.double() @ rotation)) == pytest.approx(1.0, abs=1e-9)


def test_cknna_of_independent_noise_is_near_zero():
    g = torch.Generator().manual_seed(5)
    values = [cknna(torch.randn(300, 64, generator=g), torch.randn(300, 64, generator=g)) for _ in range(3)]
    assert all(abs(v) < 0.06 for v in values)


def test_cknna_grows_with_shared_structure():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 32, generator=g)
    noise = torch.randn(300, 32, generator=g)
    weak, strong = cknna(x, x + 2.0 * noise), cknna(x, x + 0.3 * noise)
    assert 0.05 < weak < strong < 1.0


def test_cknna_bad_input_is_a_one_line_error():
    with pytest.raises(ValueError, match="same samples"):
        cknna(torch.randn(10, 3), torch.randn(11, 3))
    with pytest.raises(ValueError, match="k < n-1"):
        cknna(torch.randn(10, 3), torch.randn(10, 3), k=9)


def test_evaluate_probe_reports_metrics_and_provenance():
    latents, labels = _planted_latents(400, classes=4, seed=7, signal=1.0)
    encoder = torch.randn(400, 6, 4, generator=torch.Generator().manual_seed(8))  # (N, tokens, C)
    encoder[:, :, :] += latents.mean(dim=(2, 3))[:, None, :4]  # shares the latent's class code
    result = evaluate_probe(
        latents,
        labels,
        encoder_features=encoder,
        seed=0,
        cknna_max_samples=300,
        tokenizer={"name": "test-tokenizer", "weights_sha256": "0" * 64},
        dataset={"path": "builtin:test"},
    )
    assert result["linear_probe_accuracy"] > 0.9 and result["num_classes"] == 4
    assert 0.1 < result["cknna"] <= 1.0
    provenance = result["provenance"]
    assert provenance["num_samples"] == 400 and provenance["reference"] == {"path": "builtin:test"}
    assert provenance["feature_networks"][0]["name"] == "test-tokenizer"
    assert provenance["settings"]["cknna_samples"] == 300 and provenance["settings"]["num_test"] == 80
    assert provenance["software"]["torch"] and provenance["software"]["aligntok"]


def test_evaluate_probe_with_an_explicit_test_split():
    train, train_labels = _planted_latents(200, classes=2, seed=9, signal=1.0)
    test, test_labels = _planted_latents(100, classes=2, seed=9, signal=1.0)
    result = evaluate_probe(train, train_labels, test_latents=test, test_labels=test_labels)
    assert result["linear_probe_accuracy"] > 0.9 and result["cknna"] is None
    assert result["provenance"]["settings"]["test_fraction"] is None
    with pytest.raises(ValueError, match="without test_labels"):
        evaluate_probe(train, train_labels, test_latents=test)
    assert result["chance_accuracy"] == pytest.approx(0.5) and result["linear_probe_train_accuracy"] > 0.9
