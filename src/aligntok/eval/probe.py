"""Semantic measures of a latent space: linear-probe accuracy and CKNNA.

* Linear probe (the paper's "linear probe" column): latents are average-pooled over space to one
  C-dim vector per image, standardised with the training split's mean and std, and a multinomial
  logistic regression (L2-regularised, convex, started from zero) is fitted full-batch with
  L-BFGS; the score is top-1 accuracy on the held-out split.
* CKNNA (Huh et al. 2024, "The Platonic Representation Hypothesis"): centred kernel alignment
  restricted to mutual k-nearest neighbours. With L2-normalised features, inner-product kernels
  K and L, and alpha_ij = 1 when j is among the k nearest neighbours of i under both kernels,
  CKNNA = HSIC(alpha*K, alpha*L) / sqrt(HSIC(aK*K, aK*K) HSIC(aL*L, aL*L)), HSIC being the
  unbiased estimator of Song et al. (2012). It costs O(n^2) memory: subsample large sets.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from aligntok.eval.provenance import build_provenance

__all__ = ["average_pool", "cknna", "evaluate_probe", "linear_probe", "split_train_test"]


def average_pool(latents: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, C, H, W) latents -> (N, C) spatial means; (N, T, C) tokens -> (N, C); (N, C) unchanged."""
    x = torch.as_tensor(latents)
    if x.ndim == 4:
        return x.mean(dim=(2, 3))
    if x.ndim == 3:
        return x.mean(dim=1)
    if x.ndim == 2:
        return x
    raise ValueError(f"latents must be (N, C, H, W), (N, T, C) or (N, C), got shape {tuple(x.shape)}")


def _features_and_labels(features: Any, labels: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(features).detach()
    y = torch.as_tensor(labels).detach()
    if x.ndim != 2 or not torch.is_floating_point(x):
        raise ValueError(f"{name} features must be a float (N, D) array, got {x.dtype} {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or torch.is_floating_point(y):
        raise ValueError(f"{name} labels must be N={x.shape[0]} integers, got {y.dtype} {tuple(y.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} features contain NaN or inf values")
    return x, y.long()


def split_train_test(
    features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded random split: (train_x, train_y, test_x, test_y)."""
    x, y = _features_and_labels(features, labels, "probe")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    num_test = int(round(len(x) * test_fraction))
    if num_test < 1 or num_test >= len(x):
        raise ValueError(f"test_fraction={test_fraction} of {len(x)} samples leaves an empty split")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:num_test], order[num_test:]
    return x[train], y[train], x[test], y[test]


def linear_probe(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 500,
    device: torch.device | str | None = None,
) -> dict[str, float | int]:
    """Top-1 accuracy of a standardised multinomial logistic regression (L-BFGS, full batch).

    Returns ``accuracy`` (test), ``train_accuracy``, ``chance`` (test frequency of the most common
    class), ``num_classes``, ``num_train`` and ``num_test``.
    """
    x_train, y_train = _features_and_labels(train_features, train_labels, "train")
    x_test, y_test = _features_and_labels(test_features, test_labels, "test")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train features have {x_train.shape[1]} dims, test features {x_test.shape[1]}")
    if weight_decay < 0 or max_iter < 1:
        raise ValueError("weight_decay must be >= 0 and max_iter >= 1")
    classes = torch.unique(y_train)
    if len(classes) < 2:
        raise ValueError(f"a linear probe needs at least 2 classes in the training split, got {len(classes)}")
    device = torch.device(device or "cpu")
    x_train, x_test = x_train.to(device, torch.float32), x_test.to(device, torch.float32)
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp_min(1e-8)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    # Map labels to 0..K-1; test labels unseen in training can never be predicted (counted wrong).
    classes = classes.to(device)
    targets = torch.searchsorted(classes, y_train.to(device))
    test_index = torch.searchsorted(classes, y_test.to(device)).clamp_max(len(classes) - 1)
    test_known = classes[test_index] == y_test.to(device)

    weight = torch.zeros(x_train.shape[1], len(classes), device=device, requires_grad=True)
    bias = torch.zeros(len(classes), device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, targets) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        train_accuracy = ((x_train @ weight + bias).argmax(dim=1) == targets).double().mean().item()
        predictions = (x_test @ weight + bias).argmax(dim=1)
        accuracy = ((predictions == test_index) & test_known).double().mean().item()
        chance = torch.unique(y_test, return_counts=True)[1].max().item() / len(y_test)
    return {
        "accuracy": accuracy,
        "train_accuracy": train_accuracy,
        "chance": chance,
        "num_classes": len(classes),
        "num_train": len(x_train),
        "num_test": len(x_test),
    }


def _mutual_knn_masks(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (n, n) mask: j among the k largest kernel entries of row i, excluding i itself."""
    scores = kernel.clone()
    scores.fill_diagonal_(float("-inf"))
    neighbours = scores.topk(k, dim=1).indices
    return torch.zeros_like(kernel, dtype=torch.bool).scatter_(1, neighbours, True)


def _hsic_unbiased(kernel_a: torch.Tensor, kernel_b: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012) of two (n, n) kernels; diagonals are ignored."""
    n = kernel_a.shape[0]
    a = kernel_a.clone().fill_diagonal_(0)
    b = kernel_b.clone().fill_diagonal_(0)
    trace_ab = (a * b.T).sum()
    sums = a.sum() * b.sum() / ((n - 1) * (n - 2))
    cross = 2.0 * (a.sum(dim=0) @ b.sum(dim=1)) / (n - 2)  # 1^T A B 1
    return (trace_ab + sums - cross) / (n * (n - 3))


def cknna(
    features_a: torch.Tensor | np.ndarray,
    features_b: torch.Tensor | np.ndarray,
    k: int = 10,
    *,
    normalize: bool = True,
    device: torch.device | str | None = None,
) -> float:
    """CKNNA between two feature sets of the same n samples (float64); 1 for identical features."""
    a = torch.as_tensor(features_a).detach()
    b = torch.as_tensor(features_b).detach()
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"CKNNA needs (n, D1) and (n, D2) features of the same samples, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    n = a.shape[0]
    if not 1 <= k < n - 1 or n < 4:
        raise ValueError(f"CKNNA needs n >= 4 samples and 1 <= k < n-1, got n={n}, k={k}")
    a = a.to(device or a.device, torch.float64)
    b = b.to(a.device, torch.float64)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    kernel_a, kernel_b = a @ a.T, b @ b.T
    mask_a, mask_b = _mutual_knn_masks(kernel_a, k), _mutual_knn_masks(kernel_b, k)
    mutual = mask_a & mask_b
    cross = _hsic_unbiased(kernel_a * mutual, kernel_b * mutual)
    self_a = _hsic_unbiased(kernel_a * mask_a, kernel_a * mask_a)
    self_b = _hsic_unbiased(kernel_b * mask_b, kernel_b * mask_b)
    denominator = torch.sqrt(self_a * self_b)
    if not denominator > 0:
        warnings.warn(
            "CKNNA is undefined: a feature set has no neighbourhood structure (zero self-HSIC)",
            RuntimeWarning,
            stacklevel=2,
        )
        return math.nan
    return float(cross / denominator)


def evaluate_probe(
    latents: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    test_latents: torch.Tensor | np.ndarray | None = None,
    test_labels: torch.Tensor | np.ndarray | None = None,
    encoder_features: torch.Tensor | np.ndarray | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    weight_decay: float = 1e-4,
    cknna_k: int = 10,
    cknna_max_samples: int = 10000,
    tokenizer: Mapping[str, Any] | None = None,
    dataset: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Linear probe on average-pooled latents, and CKNNA(latents, encoder features) when given.

    Without ``test_latents`` a seeded ``test_fraction`` split of ``latents`` is held out.
    ``encoder_features`` (same images as ``latents``, e.g. the foundation encoder's patch tokens)
    are pooled the same way; CKNNA uses a seeded subsample of at most ``cknna_max_samples``.
    ``tokenizer`` / ``dataset`` are descriptions recorded in the provenance.
    """
    pooled = average_pool(latents)
    if test_latents is None:
        if test_labels is not None:
            raise ValueError("test_labels given without test_latents")
        x_train, y_train, x_test, y_test = split_train_test(pooled, labels, test_fraction, seed)
    else:
        if test_labels is None:
            raise ValueError("test_latents given without test_labels")
        x_train, y_train, x_test, y_test = pooled, labels, average_pool(test_latents), test_labels
    probe = linear_probe(x_train, y_train, x_test, y_test, weight_decay=weight_decay, device=device)
    result: dict[str, Any] = {
        "linear_probe_accuracy": probe["accuracy"],
        "linear_probe_train_accuracy": probe["train_accuracy"],
        "chance_accuracy": probe["chance"],
        "num_classes": probe["num_classes"],
        "cknna": None,
    }
    settings: dict[str, Any] = {
        "pooling": "spatial mean",
        "standardise": "train mean/std",
        "solver": "L-BFGS, full batch",
        "weight_decay": weight_decay,
        "test_fraction": None if test_latents is not None else test_fraction,
        "seed": seed,
        "num_train": probe["num_train"],
        "num_test": probe["num_test"],
    }
    if encoder_features is not None:
        encoder_pooled = average_pool(encoder_features)
        if len(encoder_pooled) != len(pooled):
            raise ValueError(f"encoder_features hold {len(encoder_pooled)} samples, latents {len(pooled)}")
        subset = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(seed))[:cknna_max_samples]
        result["cknna"] = cknna(pooled[subset], encoder_pooled[subset], k=cknna_k, device=device)
        settings.update(
            cknna_k=cknna_k, cknna_samples=len(subset), cknna_kernel="inner product of L2-normalised pooled features"
        )
    result["provenance"] = build_provenance(
        num_samples=len(pooled) + (len(x_test) if test_latents is not None else 0),
        reference=dataset,
        feature_networks=[tokenizer] if tokenizer is not None else [],
        settings=settings,
        device=device,
    )
    return result
