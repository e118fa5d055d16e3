"""Feature networks for distribution metrics: Inception-V3 (FID / IS / P&R), DINOv2 (FD_DINOv2), any module.

A :class:`FeatureNetwork` maps uint8 images (B, 3, H, W) to named float32 features:

* :class:`InceptionFeatures` is torch-fidelity's TensorFlow-exact port of the Inception graph the
  ADM evaluator uses (``pt_inception-2015-12-05``): ``pool`` is the 2048-d pool_3 output (FID,
  precision/recall), ``logits`` the 1008 logits without bias (IS, exactly as ADM's softmax graph).
  Images are resized to 299 px inside the network with TensorFlow-1.x bilinear interpolation.
* :class:`Dinov2Features` is a DINOv2 model loaded through transformers; ``pool`` is the final
  layer-normed CLS token at 224 px, with the preprocessing of torch-fidelity's ``dinov2-vit-l-14``
  extractor, so FD_DINOv2 matches that library's.
* :class:`ModuleFeatures` wraps any ``nn.Module`` (e.g. a randomly initialised net in tests).

Weights are read from explicit files or local caches; every network reports the sha256 of its
weights. When weights are missing offline the error is one line naming the file, where it was
expected and where to get it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aligntok.eval.images import (
    ImageSource,
    as_uint8,
    check_nchw_rgb,
    check_pixel_scale,
    nhwc_to_tensor,
)
from aligntok.eval.provenance import sha256_file, sha256_files
from aligntok.progress import progress_bar

#: torch-fidelity's conversion of the TF Inception graph used by the ADM / TTUR FID code.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILENAME = INCEPTION_URL.rsplit("/", 1)[1]
#: torch.hub convention: the file name carries the first 8 hex digits of the file's sha256.
INCEPTION_SHA256_PREFIX = "6726825d"
#: DINOv2 ViT-L/14, the network of FD_DINOv2 (Stein et al., 2023) and torch-fidelity's dinov2-vit-l-14.
DINOV2_DEFAULT = "facebook/dinov2-large"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(ValueError):
    """Weights for a feature network are neither at the given path nor in a local cache."""


class FeatureNetwork(nn.Module):
    """Base class: uint8 (B, 3, H, W) images -> dict of float32 (B, D) features.

    Subclasses set ``name``, ``outputs`` (feature names, ``"pool"`` always first) and the weights'
    path and sha256, and implement :meth:`features`.
    """

    name: str = "feature-network"
    outputs: tuple[str, ...] = ("pool",)
    weights_path: str | None = None
    weights_sha256: str | None = None

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        check_nchw_rgb(images, f"{self.name} input")
        if images.dtype != torch.uint8:
            raise ValueError(f"{self.name} takes uint8 images; convert with aligntok.eval.to_uint8 first")
        return {key: value.float() for key, value in self.features(images).items()}

    @property
    def device(self) -> torch.device:
        """Where inputs must go: the device of the first parameter or buffer (CPU if it has none)."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        """Provenance entry: network name, weights file and its sha256."""
        return {"name": self.name, "weights": self.weights_path, "weights_sha256": self.weights_sha256}


# ---------------------------------------------------------------------------------------------
# Inception-V3 (torch-fidelity)
# ---------------------------------------------------------------------------------------------


class InceptionFeatures(FeatureNetwork):
    """torch-fidelity's FeatureExtractorInceptionV3: ``pool`` (2048) and ``logits`` (1008, no bias)."""

    name = "inception-v3-compat"
    outputs = ("pool", "logits")

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import (
            FeatureExtractorInceptionV3,
        )

        weights_path = Path(weights_path)
        # torch-fidelity unpickles the file without restriction; refuse anything that is not a
        # plain tensor state dict before it gets there (a weights_only load is the safe check).
        try:
            torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means "not a safe weights file"
            raise ValueError(f"{weights_path}: not a loadable Inception state dict ({type(e).__name__})") from None
        try:
            self.net = FeatureExtractorInceptionV3(
                self.name, ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights_path)
            )
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(f"{weights_path}: weights do not fit torch-fidelity's Inception-V3 ({first})") from None
        self.weights_path = str(weights_path)
        self.weights_sha256 = sha256_file(weights_path)

    @property
    def is_standard(self) -> bool:
        """True when the weights are the standard pt_inception-2015-12-05 file."""
        return bool(self.weights_sha256 and self.weights_sha256.startswith(INCEPTION_SHA256_PREFIX))

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.net(images)
        return {"pool": pool, "logits": logits}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["standard_weights"] = self.is_standard
        info["preprocessing"] = "uint8 -> 299x299 TF1-bilinear resize -> (x-128)/128"
        return info


def inception_cache_path() -> Path:
    """Where torch-fidelity (torch.hub) keeps the Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def resolve_inception_weights(weights: str | os.PathLike | None = None, *, allow_download: bool = True) -> Path:
    """The Inception weights file: ``weights`` if given, else torch-fidelity's cache (downloading if allowed)."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"Inception weights file {path} does not exist; get {INCEPTION_FILENAME} from {INCEPTION_URL}"
            )
        return path
    cached = inception_cache_path()
    if cached.is_file():
        return cached
    hint = (
        f"Inception weights {INCEPTION_FILENAME} not found at {cached}; download {INCEPTION_URL} "
        f"to that path or pass --inception-weights FILE"
    )
    if not allow_download:
        raise WeightsNotFoundError(hint)
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), hash_prefix=INCEPTION_SHA256_PREFIX, progress=False)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash is a RuntimeError
        raise WeightsNotFoundError(f"{hint} (download failed: {type(e).__name__})") from None
    return cached


def load_inception(weights: str | os.PathLike | None = None, *, allow_download: bool = True) -> InceptionFeatures:
    """Inception-V3 for FID / IS / precision-recall from ``weights`` or torch-fidelity's cache."""
    return InceptionFeatures(resolve_inception_weights(weights, allow_download=allow_download))


# ---------------------------------------------------------------------------------------------
# DINOv2 (transformers)
# ---------------------------------------------------------------------------------------------


class Dinov2Features(FeatureNetwork):
    """A transformers DINOv2 model: ``pool`` = final layer-normed CLS token at 224x224."""

    outputs = ("pool",)
    input_size = 224

    def __init__(self, model_dir: str | os.PathLike, name: str = "dinov2"):
        super().__init__()
        from transformers import AutoModel

        model_dir = Path(model_dir)
        weight_files = sorted(model_dir.glob("*.safetensors"))
        if not weight_files:
            raise WeightsNotFoundError(f"{model_dir}: no .safetensors weights found for DINOv2")
        try:
            self.model = AutoModel.from_pretrained(model_dir, use_safetensors=True).eval().requires_grad_(False)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(f"{model_dir}: cannot load a DINOv2 model ({first})") from None
        self.name = name
        self.weights_path = str(model_dir)
        self.weights_sha256 = sha256_files(weight_files)
        scale = 255.0  # the network normalises pixels in [0, 255] with ImageNet statistics
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * scale, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * scale, persistent=False)

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        from torch_fidelity.interpolate_compat_tensorflow import (
            interpolate_bilinear_2d_like_tensorflow1x,
        )

        x = images.float()
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(self.input_size, self.input_size), align_corners=False)
        x = (x - self.mean) / self.std
        out = self.model(pixel_values=x)
        if getattr(out, "pooler_output", None) is None:
            raise ValueError(f"{self.weights_path}: model has no pooled (CLS) output; is it a DINOv2 model?")
        return {"pool": out.pooler_output}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["preprocessing"] = "uint8 -> 224x224 TF1-bilinear resize -> ImageNet mean/std; CLS token after final norm"
        return info


def resolve_hf_weights(name_or_path: str | os.PathLike, *, allow_download: bool = True) -> Path:
    """A local directory for a transformers model: the directory itself, or a Hub id's snapshot."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsNotFoundError(f"{path}: expected a model directory (config.json + *.safetensors)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
    )

    try:
        return Path(
            snapshot_download(
                repo_id=str(name_or_path),
                allow_patterns=["*.json", "*.safetensors"],
                local_files_only=not allow_download,
            )
        )
    except (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError):
        raise WeightsNotFoundError(
            f"model '{name_or_path}' is neither a local directory nor in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); run `hf download {name_or_path}` where there is internet, "
            f"or pass a local directory"
        ) from None


def load_dinov2(name_or_path: str | os.PathLike = DINOV2_DEFAULT, *, allow_download: bool = True) -> Dinov2Features:
    """DINOv2 from a local directory or a Hub id (local cache first, downloading if allowed)."""
    model_dir = resolve_hf_weights(name_or_path, allow_download=allow_download)
    return Dinov2Features(model_dir, name=f"dinov2:{name_or_path}")


# ---------------------------------------------------------------------------------------------
# Any module
# ---------------------------------------------------------------------------------------------


class ModuleFeatures(FeatureNetwork):
    """Wrap ``module``: float images (normalised with ``mean``/``std`` on [0, 1]) -> (B, D) features.

    Outputs of shape (B, C, H, W) or (B, N, C) are average-pooled to (B, C).
    """

    outputs = ("pool",)

    def __init__(
        self,
        module: nn.Module,
        *,
        name: str,
        input_size: int | None = None,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        weights_path: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.name = name
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if weights_path is not None:
            self.weights_path = str(weights_path)
            self.weights_sha256 = sha256_file(weights_path)

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 255.0
        if self.input_size is not None and x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        out = self.module((x - self.mean) / self.std)
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))
        elif out.ndim == 3:
            out = out.mean(dim=1)
        if out.ndim != 2:
            raise ValueError(
                f"{self.name}: module output must be (B, D), (B, N, D) or (B, C, H, W), got {tuple(out.shape)}"
            )
        return {"pool": out}


def load_module_features(
    module: nn.Module, weights_path: str | os.PathLike, *, name: str, **kwargs: Any
) -> ModuleFeatures:
    """Load a safetensors state dict into ``module`` and wrap it as a :class:`ModuleFeatures`."""
    from safetensors.torch import load_file

    path = Path(weights_path)
    if not path.is_file():
        raise WeightsNotFoundError(f"feature network weights {path} do not exist")
    try:
        module.load_state_dict(load_file(path))
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit {type(module).__name__} ({str(e).splitlines()[0]})") from None
    return ModuleFeatures(module, name=name, weights_path=path, **kwargs)


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

ImageInput = ImageSource | np.ndarray | torch.Tensor


def uint8_batches(images: ImageInput, batch_size: int) -> tuple[Iterable[torch.Tensor], int]:
    """(iterator of uint8 NCHW tensors, image count) for any supported image input."""
    if isinstance(images, ImageSource):
        return (nhwc_to_tensor(batch) for batch in images.batches(batch_size)), len(images)
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"image arrays must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        return (nhwc_to_tensor(images[i : i + batch_size]) for i in range(0, len(images), batch_size)), len(images)
    if isinstance(images, torch.Tensor):
        check_nchw_rgb(images, "images")
        check_pixel_scale(images, "images", reference=False)  # [0, 255] refused, [0, 1] warned about
        return (as_uint8(images[i : i + batch_size]) for i in range(0, len(images), batch_size)), len(images)
    raise ValueError(f"unsupported image input {type(images).__name__}; use an ImageSource, array or tensor")


@torch.inference_mode()
def extract_features(
    network: FeatureNetwork,
    images: ImageInput,
    *,
    batch_size: int = 100,
    progress: bool = False,
    desc: str | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``network`` over all ``images``; returns each output as one float32 CPU tensor (N, D).

    ``images``: an :class:`ImageSource`, a uint8 (N, H, W, 3) array, or a (N, 3, H, W) tensor (uint8,
    or float in [-1, 1], converted with :func:`to_uint8`).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batches, total = uint8_batches(images, batch_size)
    device = network.device
    collected: dict[str, list[torch.Tensor]] = {key: [] for key in network.outputs}
    with progress_bar(total=total, disable=not progress, desc=desc or network.name, unit="img") as bar:
        for batch in batches:
            out = network(batch.to(device, non_blocking=True))
            for key in network.outputs:
                collected[key].append(out[key].cpu())
            bar.update(len(batch))
    return {key: torch.cat(parts) for key, parts in collected.items()}
