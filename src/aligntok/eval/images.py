"""Image I/O for evaluation: the one float -> uint8 conversion, and sample / reference readers.

Conventions (kept identical everywhere so numbers are comparable):

* Model images are float tensors in [-1, 1], shape (B, 3, H, W). :func:`to_uint8` is the only way
  they become pixels: scale to [0, 255], round to nearest, clamp. Reconstruction metrics, saved
  samples and Inception features all see these same uint8 values.
* Saved samples are PNG (lossless), never JPEG, or an ADM-style ``.npz`` whose ``arr_0`` is a uint8
  NHWC array (``arr_1`` optionally holds labels), as written by ADM / DiT / LightningDiT samplers.
* Readers accept an ADM ``.npz`` (samples or reference batch) or a folder of images and yield
  uint8 NHWC numpy batches without loading a whole 50,000-image file into memory. Image files are
  decoded by the data layer's :func:`aligntok.data.images.load_image`, the decoder training and
  latent caching use (alpha composited over white, 16-bit scaled to 8-bit), and folders are listed
  by its :func:`~aligntok.data.images.walk_images` (each real folder once, hidden files ignored).
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy_format
from PIL import Image

from aligntok.data.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    load_image,
    walk_images,
)
from aligntok.eval.provenance import sha256_file
from aligntok.io import replace_atomically

#: File endings read from image folders (the data layer's). Samples we write are always PNG;
#: references (e.g. the ImageNet validation set) may legitimately be JPEG files as distributed.
IMAGE_SUFFIXES = tuple(sorted(IMAGE_EXTENSIONS))
_IO_THREADS = min(8, os.cpu_count() or 1)  # PIL releases the GIL while encoding/decoding


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255]: round to nearest, clamp; layout unchanged."""
    if not torch.is_floating_point(images):
        raise ValueError(f"to_uint8 expects a float tensor in [-1, 1], got dtype {images.dtype}")
    images = images.detach().float()
    if not torch.isfinite(images).all():
        raise ValueError("to_uint8: images contain NaN or inf values")
    return (images * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)


class PixelScaleWarning(UserWarning):
    """Float images that look like [0, 1] pixels where [-1, 1] is expected."""


#: How far a reference (ground-truth) float image may stray outside [-1, 1] (float rounding only).
REFERENCE_RANGE_TOLERANCE = 1e-3
#: A model output with no negative value and a maximum above this is [0, 255] pixels, not an overshoot.
OUTPUT_SCALE_LIMIT = 2.0
_SCALE_HINT = "metrics take uint8, or floats in [-1, 1] (from [0, 1]: x * 2 - 1; from [0, 255]: x / 127.5 - 1)"


def check_pixel_scale(images: torch.Tensor, name: str, *, reference: bool) -> None:
    """Refuse float images on the wrong scale in one line; warn on images that look like [0, 1].

    uint8 passes. A ``reference`` (original) image must lie in [-1, 1] (within
    :data:`REFERENCE_RANGE_TOLERANCE`); a model output may overshoot (it is clamped by
    :func:`to_uint8`, as the protocol says), but one with no negative value and a maximum above
    :data:`OUTPUT_SCALE_LIMIT` is [0, 255] pixels. A float batch with no value below 0 and none above 1
    is [0, 1] pixels by all odds (natural images in [-1, 1] have dark pixels): a
    :class:`PixelScaleWarning`, since such a batch is possible, merely unlikely.
    """
    if not torch.is_floating_point(images) or images.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(images.detach().float()))
    if not (math.isfinite(low) and math.isfinite(high)):
        return  # to_uint8 names the non-finite values
    if reference and (low < -1 - REFERENCE_RANGE_TOLERANCE or high > 1 + REFERENCE_RANGE_TOLERANCE):
        raise ValueError(f"{name} are floats in [{low:.4g}, {high:.4g}], outside [-1, 1]; {_SCALE_HINT}")
    if not reference and low >= 0 and high > OUTPUT_SCALE_LIMIT:
        raise ValueError(f"{name} are floats in [{low:.4g}, {high:.4g}], [0, 255] pixels by their look; {_SCALE_HINT}")
    if low >= 0 and high <= 1:
        warnings.warn(f"{name} are floats in [{low:.4g}, {high:.4g}], which looks like [0, 1] pixels; {_SCALE_HINT}",
                      PixelScaleWarning, stacklevel=3)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (exact inverse of :func:`to_uint8` on its outputs)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"from_uint8 expects a uint8 tensor, got dtype {images.dtype}")
    return images.float() / 127.5 - 1.0


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 tensors pass through; float tensors in [-1, 1] go through :func:`to_uint8`."""
    return images if images.dtype == torch.uint8 else to_uint8(images)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] or uint8 -> (B, H, W, 3) uint8 numpy, the on-disk layout."""
    check_nchw_rgb(images, "images")
    return as_uint8(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def nhwc_to_tensor(batch: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 numpy -> (B, 3, H, W) uint8 tensor (what feature networks take)."""
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)


def check_nchw_rgb(images: torch.Tensor, name: str) -> None:
    """Raise a one-line ValueError unless ``images`` is a (B, 3, H, W) tensor."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a (B, 3, H, W) tensor, got {shape}")


def _check_nhwc_uint8(images: np.ndarray, name: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        desc = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{name} must be a uint8 (N, H, W, 3) array, got {desc}")


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def save_png_folder(images: np.ndarray, folder: str | os.PathLike, start_index: int = 0) -> list[Path]:
    """Write uint8 NHWC images as ``folder/000000.png, ...`` (lossless; never JPEG; each file atomically)."""
    _check_nhwc_uint8(images, "images")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{start_index + i:06d}.png" for i in range(len(images))]
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        list(pool.map(write_png, images, paths))
    return paths


def write_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """One uint8 HWC image as a PNG file, atomically (a kill never leaves a truncated PNG)."""
    return replace_atomically(path, lambda staging: Image.fromarray(image).save(staging, format="PNG"))


def save_npz(images: np.ndarray, path: str | os.PathLike, labels: np.ndarray | None = None) -> Path:
    """Write an ADM-style sample file (atomically): ``arr_0`` uint8 NHWC images, ``arr_1`` labels if given."""
    _check_nhwc_uint8(images, "images")
    arrays = [images]
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        arrays.append(labels)
    return write_npz(path, *arrays)


def write_npz(path: str | os.PathLike, *arrays: np.ndarray, **named: np.ndarray) -> Path:
    """``np.savez`` (``.npz`` appended when missing, as numpy does) through an atomic replace."""
    path = Path(path) if str(path).endswith(".npz") else Path(f"{path}.npz")

    def write(staging: Path) -> None:
        with open(staging, "wb") as file:  # a file object: np.savez would append .npz to the staging name
            np.savez(file, *arrays, **named)

    return replace_atomically(path, write)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """A set of images on disk: an ADM ``.npz`` (``arr_0``) or a folder of image files."""

    path: Path
    kind: str  #: "npz" or "folder"
    num_images: int
    height: int
    width: int
    files: tuple[Path, ...] = ()  #: folder sources only, in reading order

    def __len__(self) -> int:
        return self.num_images

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield uint8 (b, H, W, 3) batches in a fixed order (file name order for folders)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if self.kind == "npz":
            yield from _npz_batches(self.path, batch_size)
        else:
            yield from _folder_batches(self, batch_size)

    def describe(self, with_hash: bool = True) -> dict[str, Any]:
        """Provenance entry: path, kind, count, resolution, and the file's sha256 for npz files."""
        info: dict[str, Any] = {
            "path": str(self.path),
            "kind": self.kind,
            "num_images": self.num_images,
            "resolution": [self.height, self.width],
        }
        if with_hash and self.kind == "npz":
            info["sha256"] = sha256_file(self.path)
        return info


def open_images(path: str | os.PathLike) -> ImageSource:
    """Open an ADM ``.npz`` (its ``arr_0``) or a folder of images (searched recursively)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"image source not found: {path}")
    if path.is_dir():
        return _open_folder(path)
    if path.suffix == ".npz":
        n, h, w = _npz_image_shape(path)
        return ImageSource(path=path, kind="npz", num_images=n, height=h, width=w)
    raise ValueError(f"{path}: expected an .npz file or a folder of images")


def read_images(path: str | os.PathLike) -> np.ndarray:
    """All images of a source as one uint8 NHWC array (for small sets; large ones: use batches)."""
    source = open_images(path)
    return np.concatenate(list(source.batches(1024)), axis=0)


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Array names stored in an .npz file (without reading the arrays)."""
    with zipfile.ZipFile(path) as archive:
        return [name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")]


def read_npz_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """Precomputed Inception statistics (``mu``, ``sigma``) of an ADM reference batch, if present."""
    keys = npz_keys(path)
    if "mu" not in keys or "sigma" not in keys:
        return None
    with np.load(path, allow_pickle=False) as data:
        return np.asarray(data["mu"], dtype=np.float64), np.asarray(data["sigma"], dtype=np.float64)


def _open_folder(folder: Path) -> ImageSource:
    files = tuple(sorted(Path(path) for path, _ in walk_images(str(folder))))
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    height, width = _decode_rgb(files[0]).shape[:2]
    return ImageSource(path=folder, kind="folder", num_images=len(files), height=height, width=width, files=files)


def _decode_rgb(path: Path) -> np.ndarray:
    try:
        # Any size: a folder of tiny samples is checked against its first image's size instead.
        return np.asarray(load_image(path, min_side=1))
    except BadImageError as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from None


def _folder_batches(source: ImageSource, batch_size: int) -> Iterator[np.ndarray]:
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        for start in range(0, source.num_images, batch_size):
            chunk = source.files[start : start + batch_size]
            decoded = list(pool.map(_decode_rgb, chunk))
            for path, image in zip(chunk, decoded, strict=True):
                if image.shape[:2] != (source.height, source.width):
                    raise ValueError(
                        f"{path}: image is {image.shape[1]}x{image.shape[0]}, expected "
                        f"{source.width}x{source.height} like {source.files[0].name}"
                    )
            yield np.stack(decoded)


def _open_npy_member(archive: zipfile.ZipFile, path: Path, key: str):
    """Open ``key``.npy inside an npz and parse its header: (file object, shape, dtype)."""
    member = f"{key}.npy"
    if member not in archive.namelist():
        found = ", ".join(npz_keys(path)) or "none"
        raise ValueError(f"{path}: no '{key}' array (arrays found: {found})")
    handle = archive.open(member)
    version = npy_format.read_magic(handle)
    if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(handle)
    else:
        raise ValueError(f"{path}: unsupported .npy format version {version} for '{key}'")
    if fortran_order:
        raise ValueError(f"{path}: '{key}' is stored in Fortran order; save it C-contiguous")
    return handle, shape, dtype


def _npz_image_shape(path: Path) -> tuple[int, int, int]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a valid .npz file") from None
    with archive:
        handle, shape, dtype = _open_npy_member(archive, path, "arr_0")
        handle.close()
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 images (N, H, W, 3), got {dtype} {tuple(shape)}")
    if shape[0] == 0:
        raise ValueError(f"{path}: arr_0 holds no images")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _npz_batches(path: Path, batch_size: int) -> Iterator[np.ndarray]:
    # Stream arr_0 straight out of the zip member (decompressing if needed) instead of np.load,
    # which would materialise all 50,000 images (~10 GB at 256 px) at once.
    with zipfile.ZipFile(path) as archive:
        handle, shape, _ = _open_npy_member(archive, path, "arr_0")
        with handle:
            num_images, image_shape = shape[0], tuple(shape[1:])
            image_bytes = int(np.prod(image_shape))
            for start in range(0, num_images, batch_size):
                count = min(batch_size, num_images - start)
                raw = handle.read(count * image_bytes)
                if len(raw) != count * image_bytes:
                    raise ValueError(f"{path}: arr_0 is truncated (expected {num_images} images)")
                yield np.frombuffer(bytearray(raw), dtype=np.uint8).reshape((count, *image_shape))
