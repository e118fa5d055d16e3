"""Generation metrics with the ADM protocol: FID, IS, precision/recall, plus FD_DINOv2 as a second opinion.

``evaluate_generation(samples, ref)`` follows guided-diffusion's ``evaluations/evaluator.py``:
samples are an ADM ``.npz`` (``arr_0`` uint8 NHWC) or a folder of PNGs; the reference is an ADM
reference batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``: ``arr_0`` images plus precomputed
Inception ``mu`` / ``sigma``; ``mu_s`` / ``sigma_s`` for sFID are not used) or a folder of images.
FID uses the reference's precomputed statistics when present (as ADM does) and reference
features computed from its images otherwise; precision/recall always need the reference images.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.eval.features import (
    DINOV2_DEFAULT,
    FeatureNetwork,
    InceptionFeatures,
    WeightsNotFoundError,
    extract_features,
    load_dinov2,
    load_inception,
)
from aligntok.eval.fid import (
    ADM_IS_SPLIT_SIZE,
    FeatureStats,
    frechet_distance,
    inception_score,
    precision_recall,
)
from aligntok.eval.images import ImageSource, npz_keys, open_images, read_npz_statistics
from aligntok.eval.provenance import build_provenance

#: Printed next to every FD_DINOv2 number.
FD_DINOV2_BIAS_NOTE = (
    "FD_DINOv2 is a Fréchet distance in DINOv2 feature space. Tokenizers whose latents are aligned to "
    "DINOv2 (AlignTok, VA-VAE, RAE, REPA-style training) can be favoured by it, so read it as a second "
    "opinion next to FID, not as a replacement."
)
ADM_NUM_SAMPLES = 50_000
_STATS_CHUNK = 10_000  # rows per float64 covariance update: bounds device memory


def _feature_stats(features: torch.Tensor, device: torch.device) -> FeatureStats:
    stats = FeatureStats()
    for chunk in features.split(_STATS_CHUNK):
        stats.update(chunk.to(device))
    return stats


def _open_reference(ref: str | os.PathLike | ImageSource, use_reference_stats: bool):
    """(image source or None, precomputed (mu, sigma) or None) of a reference."""
    if isinstance(ref, ImageSource):
        stats = read_npz_statistics(ref.path) if use_reference_stats and ref.kind == "npz" else None
        return ref, stats
    path = Path(ref)
    if path.is_file() and path.suffix == ".npz":
        stats = read_npz_statistics(path) if use_reference_stats else None
        source = open_images(path) if "arr_0" in npz_keys(path) else None
        if source is None and stats is None:
            raise ValueError(f"{path}: reference .npz holds neither images ('arr_0') nor statistics ('mu', 'sigma')")
        return source, stats
    return open_images(path), None


def _resolve_dinov2(
    dinov2: FeatureNetwork | str | os.PathLike | None, allow_download: bool
) -> tuple[FeatureNetwork | None, str | None]:
    """(network or None, reason it is missing). "auto": the default model if it is cached locally."""
    if dinov2 is None:
        return None, "not requested"
    if isinstance(dinov2, FeatureNetwork):
        return dinov2, None
    if dinov2 == "auto":
        try:
            return load_dinov2(DINOV2_DEFAULT, allow_download=False), None
        except WeightsNotFoundError as e:
            return None, str(e)
    return load_dinov2(dinov2, allow_download=allow_download), None


def _frechet_between(
    network: FeatureNetwork, a: ImageSource, b: ImageSource, *, batch_size: int, device: torch.device, progress: bool
) -> float:
    """Fréchet distance between the ``pool`` features of two image sets."""
    stats = [
        _feature_stats(extract_features(network, s, batch_size=batch_size, progress=progress)["pool"], device)
        for s in (a, b)
    ]
    return frechet_distance(stats[0].mean, stats[0].cov, stats[1].mean, stats[1].cov)


def _inception_metrics(
    inception: FeatureNetwork,
    samples: ImageSource,
    ref_source: ImageSource | None,
    ref_stats: tuple[np.ndarray, np.ndarray] | None,
    *,
    batch_size: int,
    is_split_size: int,
    pr_k: int,
    device: torch.device,
    progress: bool,
    notes: list[str],
) -> tuple[dict[str, Any], str]:
    """FID, IS, precision and recall as ADM computes them; also says where the reference stats came from."""
    sample_features = extract_features(inception, samples, batch_size=batch_size, progress=progress, desc="samples")
    sample_stats = _feature_stats(sample_features["pool"], device)
    ref_features = None
    if ref_source is not None:
        ref_features = extract_features(
            inception, ref_source, batch_size=batch_size, progress=progress, desc="reference"
        )
    if ref_stats is not None:
        origin = "precomputed (reference .npz mu/sigma)"
        if ref_stats[0].shape != (sample_stats.dim,):
            raise ValueError(
                f"reference statistics have {ref_stats[0].shape[0]} dims but {inception.name} gives {sample_stats.dim}"
            )
        if isinstance(inception, InceptionFeatures) and not inception.is_standard:
            warnings.warn(
                "the reference's precomputed statistics assume the standard Inception weights; this network's "
                f"weights differ (sha256 {inception.weights_sha256[:12]}...), so FID is not comparable",
                stacklevel=2,
            )
    else:
        origin = "computed from reference images"
        computed = _feature_stats(ref_features["pool"], device)
        ref_stats = computed.mean, computed.cov

    metrics: dict[str, Any] = {
        "fid": frechet_distance(sample_stats.mean, sample_stats.cov, *ref_stats),
        "inception_score": None,
        "inception_score_std": None,
        "precision": None,
        "recall": None,
    }
    if "logits" in sample_features:
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(
            sample_features["logits"], is_split_size
        )
    else:
        notes.append(f"inception_score not computed: {inception.name} has no classifier logits")
    if ref_features is not None:
        metrics["precision"], metrics["recall"] = precision_recall(
            sample_features["pool"].to(device), ref_features["pool"].to(device), k=pr_k
        )
    else:
        notes.append("precision/recall not computed: the reference holds statistics but no images")
    return metrics, origin


def evaluate_generation(
    samples: str | os.PathLike | ImageSource,
    ref: str | os.PathLike | ImageSource,
    *,
    inception: FeatureNetwork | None = None,
    inception_weights: str | os.PathLike | None = None,
    dinov2: FeatureNetwork | str | os.PathLike | None = "auto",
    batch_size: int = 100,
    is_split_size: int = ADM_IS_SPLIT_SIZE,
    pr_k: int = 3,
    use_reference_stats: bool = True,
    allow_download: bool = True,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """FID, IS, precision, recall (ADM protocol) and, when DINOv2 is available, FD_DINOv2.

    ``inception``: a ready network, else loaded from ``inception_weights`` or torch-fidelity's cache.
    ``dinov2``: "auto" (the default ViT-L/14 if it is in the local Hugging Face cache, else skipped),
    None (skip), a model directory / Hub id (must load), or a ready network.
    Returns a JSON-ready dict with ``fid``, ``inception_score``, ``precision``, ``recall``,
    ``fd_dinov2`` (when computed), notes, warnings and ``provenance``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sample_source = samples if isinstance(samples, ImageSource) else open_images(samples)
    ref_source, ref_stats = _open_reference(ref, use_reference_stats)
    if inception is None:
        inception = load_inception(inception_weights, allow_download=allow_download)
    inception = inception.to(device)
    dinov2_net, dinov2_missing = _resolve_dinov2(dinov2, allow_download)
    run_options = {"batch_size": batch_size, "device": device, "progress": progress}

    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, ref_stats_origin = _inception_metrics(
            inception, sample_source, ref_source, ref_stats, is_split_size=is_split_size, pr_k=pr_k, notes=notes, **run_options
        )
        if dinov2_net is not None and ref_source is not None:
            dinov2_net = dinov2_net.to(device)
            result["fd_dinov2"] = _frechet_between(dinov2_net, sample_source, ref_source, **run_options)
            result["fd_dinov2_note"] = FD_DINOV2_BIAS_NOTE
        else:
            reason = dinov2_missing if dinov2_net is None else "the reference holds no images"
            result["fd_dinov2_note"] = f"fd_dinov2 not computed ({reason}). {FD_DINOV2_BIAS_NOTE}"
    ours = [w for w in caught if "aligntok" in (w.filename or "")]
    for other in caught:  # warnings of other libraries go on to the caller unchanged
        if other not in ours:
            warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)

    if len(sample_source) != ADM_NUM_SAMPLES:
        notes.append(
            f"{len(sample_source)} samples: FID and IS depend on the sample count; published ImageNet numbers "
            f"use {ADM_NUM_SAMPLES:,}"
        )
    result["num_samples"] = len(sample_source)
    result["num_reference_images"] = len(ref_source) if ref_source is not None else None
    result["notes"] = notes
    result["warnings"] = sorted({str(w.message) for w in ours})

    networks = [inception.describe()] + ([dinov2_net.describe()] if dinov2_net is not None else [])
    reference = ref_source.describe() if ref_source is not None else {"path": str(ref), "kind": "npz statistics"}
    reference["fid_statistics"] = ref_stats_origin
    result["provenance"] = build_provenance(
        num_samples=len(sample_source),
        reference=reference,
        feature_networks=networks,
        settings={
            "protocol": "ADM evaluation suite (guided-diffusion evaluations/evaluator.py)",
            "samples": sample_source.describe(),
            "fid_features": "Inception pool_3 (2048-d)",
            "is_split_size": is_split_size,
            "is_shuffle": False,
            "precision_recall_k": pr_k,
            "use_reference_stats": use_reference_stats,
            "batch_size": batch_size,
        },
        device=device,
    )
    return result
