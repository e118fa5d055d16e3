"""Evaluation with the field's protocols: reconstruction, generation and semantic metrics.

* :mod:`aligntok.eval.images` — the one float -> uint8 conversion (:func:`to_uint8`), PNG / ADM
  ``.npz`` writers and streaming readers.
* :mod:`aligntok.eval.features` — Inception-V3 (torch-fidelity), DINOv2 (transformers) and
  any-module feature networks, with weights from files or local caches.
* :mod:`aligntok.eval.fid` — float64 streaming statistics, Fréchet distance, IS, precision/recall.
* :mod:`aligntok.eval.recon` — PSNR, SSIM, LPIPS and the streaming :class:`ReconMetrics` (+ rFID).
* :mod:`aligntok.eval.generation` — :func:`evaluate_generation` (ADM protocol, + FD_DINOv2).
* :mod:`aligntok.eval.probe` — linear probe on pooled latents and CKNNA.
* :mod:`aligntok.eval.provenance` — what every result records next to its numbers.
"""

from aligntok.eval.features import (
    Dinov2Features,
    FeatureNetwork,
    InceptionFeatures,
    ModuleFeatures,
    WeightsNotFoundError,
    extract_features,
    load_dinov2,
    load_inception,
    load_module_features,
)
from aligntok.eval.fid import (
    FeatureStats,
    SingularCovarianceWarning,
    frechet_distance,
    inception_score,
    precision_recall,
)
from aligntok.eval.generation import FD_DINOV2_BIAS_NOTE, evaluate_generation
from aligntok.eval.images import (
    ImageSource,
    from_uint8,
    open_images,
    read_images,
    read_npz_statistics,
    save_npz,
    save_png_folder,
    to_uint8,
    to_uint8_nhwc,
)
from aligntok.eval.probe import (
    average_pool,
    cknna,
    evaluate_probe,
    linear_probe,
    split_train_test,
)
from aligntok.eval.provenance import build_provenance, sha256_file, software_versions
from aligntok.eval.recon import LPIPSMetric, ReconMetrics, psnr, ssim

__all__ = [
    "FD_DINOV2_BIAS_NOTE",
    "Dinov2Features",
    "FeatureNetwork",
    "FeatureStats",
    "ImageSource",
    "InceptionFeatures",
    "LPIPSMetric",
    "ModuleFeatures",
    "ReconMetrics",
    "SingularCovarianceWarning",
    "WeightsNotFoundError",
    "average_pool",
    "build_provenance",
    "cknna",
    "evaluate_generation",
    "evaluate_probe",
    "extract_features",
    "frechet_distance",
    "from_uint8",
    "inception_score",
    "linear_probe",
    "load_dinov2",
    "load_inception",
    "load_module_features",
    "open_images",
    "precision_recall",
    "psnr",
    "read_images",
    "read_npz_statistics",
    "save_npz",
    "save_png_folder",
    "sha256_file",
    "software_versions",
    "split_train_test",
    "ssim",
    "to_uint8",
    "to_uint8_nhwc",
]
