"""Distribution metrics on features: Fréchet distance (FID / FD_DINOv2), Inception Score, precision/recall.

Protocols (the ADM evaluation suite, Dhariwal & Nichol 2021, which the paper's numbers use):

* FID: Fréchet distance between Gaussians fitted to 2048-d pool_3 features; statistics are
  accumulated in float64 (:class:`FeatureStats`, numerically stable pairwise updates), covariances
  with ``ddof=1`` like ``np.cov``. The trace of the matrix square root is taken through a symmetric
  eigen-decomposition, tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), which stays real and
  stable on the near-singular covariances where ``scipy.linalg.sqrtm(S1 @ S2)`` (ADM) returns
  complex or non-finite values; if the decomposition itself fails, an ``eps`` is added to both
  diagonals, as ADM's fallback does.
* IS: exp(E KL(p(y|x) || p(y))) on the softmax of the 1008 bias-free logits, per contiguous,
  unshuffled chunk of 5,000 samples (the last one holding the rest), averaged over the chunks: ADM's
  ``compute_inception_score(split_size=5000)``. Fifty thousand samples give its ten splits; other counts
  give as many chunks as fit, not always ten.
* Precision / recall: Kynkäänniemi et al. (2019) k-NN manifolds with k = 3 on pool_3 features,
  precision = fraction of samples inside the reference manifold, recall = fraction of references
  inside the sample manifold. torch-fidelity's batched implementation is used.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

__all__ = [
    "ADM_IS_SPLIT_SIZE",
    "FeatureStats",
    "SingularCovarianceWarning",
    "frechet_distance",
    "inception_score",
    "precision_recall",
]


class SingularCovarianceWarning(UserWarning):
    """Fewer samples than feature dimensions: the covariance is singular and FID is biased."""


def _as_float64_matrix(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(x)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) feature array, got shape {tuple(tensor.shape)}")
    if not torch.is_floating_point(tensor):
        tensor = tensor.float()
    tensor = tensor.detach().to(torch.float64)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contain NaN or inf values")
    return tensor


class FeatureStats:
    """Streaming mean and covariance of feature vectors, accumulated in float64.

    Each batch is reduced to (count, mean, centred scatter) and merged with the running values by
    the pairwise update of Chan et al., which avoids the cancellation of E[xx^T] - mu mu^T.
    Accumulators live on the device of the first batch.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._scatter: torch.Tensor | None = None  # sum of (x - mean)(x - mean)^T

    @property
    def dim(self) -> int | None:
        return None if self._mean is None else self._mean.numel()

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of features (N, D)."""
        batch = _as_float64_matrix(features, "features")
        if self._mean is not None:
            if batch.shape[1] != self.dim:
                raise ValueError(f"feature dimension changed from {self.dim} to {batch.shape[1]}")
            batch = batch.to(self._mean.device)
        if batch.shape[0] == 0:
            return
        mean = batch.mean(dim=0)
        centred = batch - mean
        self._merge(batch.shape[0], mean, centred.T @ centred)

    def merge(self, other: FeatureStats) -> None:
        """Fold another accumulator (e.g. another rank's) into this one."""
        if other.count == 0:
            return
        assert other._mean is not None and other._scatter is not None
        device = self._mean.device if self._mean is not None else other._mean.device
        self._merge(other.count, other._mean.to(device), other._scatter.to(device))

    def _merge(self, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        if self._mean is None or self._scatter is None:
            self.count, self._mean, self._scatter = count, mean.clone(), scatter.clone()
            return
        if mean.numel() != self._mean.numel():
            raise ValueError(f"cannot merge statistics of dimension {mean.numel()} into dimension {self.dim}")
        total = self.count + count
        delta = mean - self._mean
        self._scatter += scatter + torch.outer(delta, delta) * (self.count * count / total)
        self._mean += delta * (count / total)
        self.count = total

    def across_ranks(self) -> FeatureStats:
        """The statistics of every torch.distributed rank combined (``self`` when not distributed).

        Call on every rank; each needs at least one batch. ``self`` is left unchanged.
        """
        import torch.distributed as dist

        from aligntok.training.distributed import is_distributed

        if not is_distributed():
            return self
        if self._mean is None or self._scatter is None:
            raise ValueError("FeatureStats.across_ranks: every rank needs at least one batch")
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self._mean.device)
        packed = torch.cat([count, self._mean, self._scatter.flatten()])
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, packed)
        dim = self._mean.numel()
        combined = FeatureStats()
        for part in gathered:
            combined._merge(int(part[0].item()), part[1 : 1 + dim], part[1 + dim :].view(dim, dim))
        return combined

    @property
    def mean(self) -> np.ndarray:
        """Mean feature vector, float64 (D,)."""
        if self._mean is None:
            raise ValueError("FeatureStats has no samples")
        return self._mean.cpu().numpy().copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (ddof=1, as np.cov), float64 (D, D). Warns when N <= D."""
        if self._scatter is None or self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self.count}")
        if self.count <= self.dim:
            warnings.warn(
                f"covariance of {self.count} samples in {self.dim} dimensions is singular (rank <= "
                f"{self.count - 1}); the Fréchet distance is strongly biased. Use more than {self.dim} "
                f"samples (the ADM protocol uses 50,000)",
                SingularCovarianceWarning,
                stacklevel=2,
            )
        return (self._scatter / (self.count - 1)).cpu().numpy()

    def save_npz(self, path: str | os.PathLike) -> Path:
        """Write ``mu`` / ``sigma`` (the keys of ADM reference batches) and ``count``, atomically."""
        from aligntok.eval.images import write_npz

        return write_npz(path, mu=self.mean, sigma=self.cov, count=np.int64(self.count))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues are zeroed."""
    eigenvalues, eigenvectors = scipy.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 @ sigma2) for symmetric PSD inputs, via a symmetric PSD similar matrix."""
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    inner = (inner + inner.T) / 2  # symmetric in exact arithmetic; remove rounding asymmetry
    eigenvalues = scipy.linalg.eigvalsh(inner)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians, in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"covariances must be ({dim}, {dim}) to match the means, got {sigma1.shape} and {sigma2.shape}"
        )
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or inf values")
    diff = mu1 - mu2
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        warnings.warn(
            f"eigen-decomposition failed; adding {eps} to the covariance diagonals", RuntimeWarning, stacklevel=2
        )
        offset = np.eye(dim) * eps
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    # Mathematically >= 0; rounding can leave about -1e-12 * trace for identical inputs.
    return max(distance, 0.0)


ADM_IS_SPLIT_SIZE = 5000  #: samples per Inception Score chunk in ADM's evaluator


def inception_score(logits: torch.Tensor | np.ndarray, split_size: int = ADM_IS_SPLIT_SIZE) -> tuple[float, float]:
    """(mean, std) of the Inception Score over contiguous, unshuffled chunks of ``split_size`` samples.

    As ADM's evaluator (guided-diffusion ``evaluations/evaluator.py``, ``compute_inception_score``): chunk
    ``i`` holds samples ``[i * split_size, (i + 1) * split_size)``, the last one what is left, and each
    chunk's score is ``exp(mean_x KL(p(y|x) || mean_chunk p(y|x)))``. ADM reports the mean; the std over
    the chunks is returned too. ``logits`` are the network's 1008 bias-free logits (N, C); float64.
    """
    logits = _as_float64_matrix(logits, "logits").cpu()
    if split_size < 1 or logits.shape[0] < 1:
        raise ValueError(
            f"inception score needs split_size >= 1 and at least one sample, got split_size={split_size} and "
            f"{logits.shape[0]} samples"
        )
    scores = []
    for chunk in torch.split(logits, split_size):
        log_p = torch.log_softmax(chunk, dim=1)
        log_marginal = torch.logsumexp(log_p, dim=0) - math.log(chunk.shape[0])  # log of the chunk's mean p(y|x)
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()
        scores.append(torch.exp(kl))
    scores_t = torch.stack(scores)
    return float(scores_t.mean()), float(scores_t.std(unbiased=False))


def precision_recall(
    sample_features: torch.Tensor | np.ndarray,
    reference_features: torch.Tensor | np.ndarray,
    k: int = 3,
    batch_size: int = 10000,
) -> tuple[float, float]:
    """(precision, recall) with k-NN manifolds (Kynkäänniemi et al. 2019; k=3 as in ADM).

    A point's manifold radius is the distance to its k-th nearest neighbour within its own set
    (excluding itself). Precision: fraction of samples within some reference radius. Recall:
    fraction of references within some sample radius. Distances in float32, like ADM.
    """
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    samples = torch.as_tensor(sample_features).detach().float()
    references = torch.as_tensor(reference_features).detach().float().to(samples.device)
    for name, value in (("sample_features", samples), ("reference_features", references)):
        if value.ndim != 2 or value.shape[0] <= k:
            raise ValueError(f"{name} must be (N, D) with N > k={k}, got shape {tuple(value.shape)}")
    if samples.shape[1] != references.shape[1]:
        raise ValueError(f"feature dimensions differ: samples {samples.shape[1]}, references {references.shape[1]}")
    precision, recall = calculate_precision_recall_part(samples, references, neighborhood=k, batch_size=batch_size)
    return float(precision), float(recall)
