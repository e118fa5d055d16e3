"""Fréchet distance, streaming statistics, Inception Score and precision/recall against independent maths."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric

from aligntok.eval import (
    FeatureStats,
    SingularCovarianceWarning,
    frechet_distance,
    inception_score,
    precision_recall,
)


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def _adm_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """ADM / TTUR route: scipy.linalg.sqrtm of the product, real part of its trace."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def test_closed_form_for_diagonal_gaussians():
    # For diagonal covariances FD = |m1-m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 exactly.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_closed_form_for_general_gaussians_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = _random_spd(rng, 16), _random_spd(rng, 16)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_adm_frechet(mu1, s1, mu2, s2), rel=1e-10)


def test_fid_of_sampled_gaussian_sets_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    dim, n = 4, 40000
    mu1, mu2 = np.zeros(dim), np.full(dim, 0.5)
    a, b = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 1.0, 1.0, 0.5])
    x = rng.normal(size=(n, dim)) * np.sqrt(a) + mu1
    y = rng.normal(size=(n, dim)) * np.sqrt(b) + mu2
    stats_x, stats_y = FeatureStats(), FeatureStats()
    for chunk in np.array_split(x, 7):
        stats_x.update(chunk)
    stats_y.update(torch.from_numpy(y))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    measured = frechet_distance(stats_x.mean, stats_x.cov, stats_y.mean, stats_y.cov)
    assert measured == pytest.approx(expected, rel=0.03)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(500, 64)) * rng.uniform(0.1, 5, size=64) + 3.0
    stats = FeatureStats()
    stats.update(features)
    distance = frechet_distance(stats.mean, stats.cov, stats.mean, stats.cov)
    assert 0.0 <= distance < 1e-9 * np.trace(stats.cov)


def test_matches_torch_fidelity_on_the_same_features():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 32)).astype(np.float32)
    y = (rng.normal(size=(300, 32)) * 1.3 + 0.2).astype(np.float32)
    ours_x, ours_y = FeatureStats(), FeatureStats()
    ours_x.update(x)
    ours_y.update(y)
    ours = frechet_distance(ours_x.mean, ours_x.cov, ours_y.mean, ours_y.cov)
    # torch-fidelity computes its statistics with np.mean / np.cov and FID through eigvals.
    theirs = fid_statistics_to_metric(
        {"mu": x.mean(0).astype(np.float64), "sigma": np.cov(x, rowvar=False)},
        {"mu": y.mean(0).astype(np.float64), "sigma": np.cov(y, rowvar=False)},
        verbose=False,
    )["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-8)


def test_singular_covariances_warn_and_stay_real_and_finite():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 64)), rng.normal(size=(40, 64)) + 0.1
    stats_x, stats_y = FeatureStats(), FeatureStats()
    stats_x.update(x)
    stats_y.update(y)
    with pytest.warns(SingularCovarianceWarning, match="40 samples in 64 dimensions"):
        sigma_x = stats_x.cov
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SingularCovarianceWarning)
        sigma_y = stats_y.cov
    ours = frechet_distance(stats_x.mean, sigma_x, stats_y.mean, sigma_y)
    theirs = fid_statistics_to_metric(
        {"mu": stats_x.mean, "sigma": sigma_x}, {"mu": stats_y.mean, "sigma": sigma_y}, False
    )
    assert np.isfinite(ours) and ours > 0
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)


def test_streaming_stats_equal_numpy_and_survive_a_large_offset():
    rng = np.random.default_rng(6)
    # A mean of 1e6 and unit variance: E[xx^T] - mu mu^T would lose ~all digits here.
    features = rng.normal(size=(1000, 8)) + 1e6
    stats = FeatureStats()
    for chunk in np.split(features, [1, 10, 400, 401]):
        stats.update(chunk)
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean, features.mean(0), rtol=1e-14)
    np.testing.assert_allclose(stats.cov, np.cov(features, rowvar=False), rtol=0, atol=1e-9)


def test_merge_equals_one_pass():
    rng = np.random.default_rng(7)
    features = rng.normal(size=(200, 5)) * 3 + 1
    whole, left, right = FeatureStats(), FeatureStats(), FeatureStats()
    whole.update(features)
    left.update(features[:37])
    right.update(features[37:])
    left.merge(right)
    assert left.count == 200
    np.testing.assert_allclose(left.mean, whole.mean, atol=1e-12)
    np.testing.assert_allclose(left.cov, whole.cov, atol=1e-12)


def test_stats_npz_has_adm_keys(tmp_path):
    stats = FeatureStats()
    stats.update(np.random.default_rng(8).normal(size=(20, 3)))
    with np.load(stats.save_npz(tmp_path / "ref.npz")) as data:
        np.testing.assert_array_equal(data["mu"], stats.mean)
        np.testing.assert_array_equal(data["sigma"], stats.cov)
        assert int(data["count"]) == 20


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "same length"),
        ((np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), r"must be \(3, 3\)"),
        ((np.array([0, np.nan, 0]), np.eye(3), np.zeros(3), np.eye(3)), "mu1 contains NaN"),
    ],
)
def test_bad_statistics_are_one_line_errors(args, message):
    with pytest.raises(ValueError, match=message) as info:
        frechet_distance(*args)
    assert "\n" not in str(info.value)


def test_feature_stats_rejects_bad_batches():
    stats = FeatureStats()
    with pytest.raises(ValueError, match="2-D"):
        stats.update(np.zeros(4))
    stats.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="dimension changed from 4 to 5"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 4), np.nan))


def _adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """ADM's compute_inception_score written out in numpy: contiguous chunks of split_size, the last short."""
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(part) - np.log(marginal))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def test_inception_score_of_uniform_logits_is_one():
    mean, std = inception_score(torch.zeros(50, 1008), split_size=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_counts_confident_balanced_classes():
    labels = torch.arange(240) % 8  # each chunk of 24 holds every one of the 8 classes 3 times
    logits = 50.0 * torch.nn.functional.one_hot(labels, 1008).double()
    mean, _ = inception_score(logits, split_size=24)
    assert mean == pytest.approx(8.0, rel=1e-6)


def test_inception_score_uses_adms_fixed_chunks_of_5000():
    """12,000 confident samples: the first 5,000 spread over 5 classes (IS 5), the next 5,000 over 10
    (IS 10), the last 2,000 over 4 (IS 4). ADM's chunks of 5,000 give (5 + 10 + 4) / 3; ten equal splits
    of 1,200 would mix the groups and give another number."""
    labels = torch.cat([torch.arange(5000) % 5, 5 + torch.arange(5000) % 10, 15 + torch.arange(2000) % 4])
    logits = 60.0 * torch.nn.functional.one_hot(labels, 20).double()
    mean, std = inception_score(logits)  # default: ADM's split size
    assert mean == pytest.approx((5 + 10 + 4) / 3, rel=1e-6)
    assert std == pytest.approx(np.std([5.0, 10.0, 4.0]), rel=1e-6)
    assert mean == pytest.approx(_adm_inception_score(logits.numpy(), 5000), rel=1e-9)


def test_inception_score_matches_the_adm_formula_without_shuffling():
    logits = np.random.default_rng(9).normal(size=(105, 20)) * 3
    mean, _ = inception_score(logits, split_size=10)  # ten chunks of 10 and one of 5
    assert mean == pytest.approx(_adm_inception_score(logits, 10), rel=1e-10)


def test_inception_score_needs_samples_and_a_positive_split_size():
    with pytest.raises(ValueError, match="split_size"):
        inception_score(torch.zeros(5, 10), split_size=0)
    with pytest.raises(ValueError, match="at least one sample"):
        inception_score(torch.zeros(0, 10))


def _brute_force_precision_recall(samples: np.ndarray, refs: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    cross = np.linalg.norm(samples[:, None] - refs[None], axis=-1)
    precision = np.mean((cross <= radii(refs)[None, :]).any(axis=1))
    recall = np.mean((cross.T <= radii(samples)[None, :]).any(axis=1))
    return float(precision), float(recall)


def test_precision_recall_of_a_set_against_itself_is_one():
    features = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    assert precision_recall(features, features) == (1.0, 1.0)


def test_precision_recall_matches_brute_force_knn_manifolds():
    rng = np.random.default_rng(10)
    samples = rng.normal(size=(80, 6)).astype(np.float32)
    refs = (rng.normal(size=(70, 6)) * 1.5 + 0.7).astype(np.float32)
    precision, recall = precision_recall(samples, refs, k=3)
    expected = _brute_force_precision_recall(samples.astype(np.float64), refs.astype(np.float64), 3)
    assert (precision, recall) == pytest.approx(expected, abs=1e-6)  # fractions of 80 and 70: exact counts
    assert 0.0 < precision < 1.0 and 0.0 < recall < 1.0


def test_precision_recall_of_disjoint_sets_is_zero():
    rng = np.random.default_rng(11)
    samples = rng.normal(size=(30, 4))
    assert precision_recall(samples, samples + 100.0) == (0.0, 0.0)


def test_precision_recall_rejects_mismatched_features():
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(torch.zeros(10, 3), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="N > k=3"):
        precision_recall(torch.zeros(3, 4), torch.zeros(10, 4))
