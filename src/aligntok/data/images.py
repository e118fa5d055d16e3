"""Images from files: robust decoding, ADM's center crop, tensors, and image-folder datasets.

Everything that brings an image into the project goes through :func:`load_image` (any PIL-readable
file to 8-bit RGB, or a one-line :class:`BadImageError`) and :func:`center_crop` (the ADM crop used by
DiT / LightningDiT / VA-VAE). :class:`IndexedImageDataset` is the map-style base every indexable
dataset shares: it replaces unreadable images deterministically, applies the (seed, epoch, index)
random flip and builds the sample dict the loaders collate.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from aligntok.errors import first_line

#: Images with more pixels than this are refused before decoding (decompression bombs).
#: Twice PIL's own warning threshold (~178M pixels); ``None`` disables the check.
MAX_IMAGE_PIXELS: int | None = 2 * 89_478_485

#: Images whose short side is below this many pixels are refused: upscaling them to a training
#: resolution produces a blur, not an image.
MIN_IMAGE_SIDE: int = 8

#: File extensions (lower case) treated as images when scanning folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

# Exceptions PIL raises on corrupt, truncated or unidentifiable data (its decoders are not uniform).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError,
                  Image.DecompressionBombError)

_SEED_MASK = (1 << 64) - 1

log = logging.getLogger(__name__)


class BadImageError(ValueError):
    """A file that cannot be turned into an RGB image; the message is a one-line reason."""


class SampleKey(NamedTuple):
    """What the loader asks a map-style dataset for: a position and the epoch it is drawn in."""

    index: int
    epoch: int = 0


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def _open_checked(source: str | os.PathLike | bytes) -> Image.Image:
    """Open (header only) with PIL's bomb check at our limit, its warning raised as an error."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise BadImageError("empty file")
        stream: io.BytesIO | str | os.PathLike = io.BytesIO(source)
    else:
        try:
            if os.path.getsize(source) == 0:
                raise BadImageError("empty file")
        except OSError as e:
            raise BadImageError(f"cannot read file ({e.strerror or e})") from None
        stream = source
    # PIL reads its global at open time; swapping it in per call lets tests lower our limit.
    # (Not thread-safe; DataLoader workers are processes.)
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(stream)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImageError(f"decompression bomb refused ({str(e).splitlines()[0]})") from None
    except Image.UnidentifiedImageError:
        raise BadImageError("not an image (PIL cannot identify the format)") from None
    except _DECODE_ERRORS as e:
        raise BadImageError(f"cannot open image ({first_line(e)})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def _scale_to_uint8(array: np.ndarray, peak: float) -> np.ndarray:
    """Single-channel pixels with white at ``peak`` to 0..255 (PIL's own convert clips instead)."""
    return np.clip(np.rint(array.astype(np.float64) * (255.0 / peak)), 0, 255).astype(np.uint8)


def _white_level(array: np.ndarray, mode: str) -> float:
    """The value of white: 16-bit modes say so; 32-bit int and float modes are judged by range."""
    if mode.startswith("I;16"):
        return 65535.0
    top = float(array.max(initial=0))
    if mode == "F":
        return 1.0 if top <= 1.0 else 255.0
    return 255.0 if top <= 255 else 65535.0 if top <= 65535 else float(np.iinfo(np.int32).max)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB, the one conversion every reader and writer of the project uses.

    Transparency (RGBA, LA, PA, palette transparency) is composited over a white background, as a
    viewer shows it; 16-bit and 32-bit integer / float modes are scaled so that their white maps to 255
    (PIL's own ``convert("RGB")`` clips them instead: a 16-bit image turns nearly white).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image)
        return Image.fromarray(_scale_to_uint8(array, _white_level(array, mode)), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(source: str | os.PathLike | bytes, *, min_side: int = MIN_IMAGE_SIDE) -> Image.Image:
    """Decode a file path or encoded bytes to an 8-bit RGB PIL image: the one decoder of training,
    latent caching and evaluation.

    CMYK, 16-bit, grayscale, palette and alpha images are converted by :func:`to_rgb` (alpha over
    white). Raises :class:`BadImageError` with a one-line reason for missing, empty, truncated,
    unidentifiable or too-small (short side < ``min_side``) images, and refuses images above
    :data:`MAX_IMAGE_PIXELS` without decoding them.
    """
    image = _open_checked(source)
    try:
        width, height = image.size
        if min(width, height) < min_side:
            raise BadImageError(f"image too small ({width}x{height}; short side must be >= {min_side})")
        # PIL's default, enforced: a truncated file must be an error, not an image padded with grey.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            image.load()
            rgb = to_rgb(image)
            # Copy when no conversion happened: closing the source below would invalidate it.
            return rgb.copy() if rgb is image else rgb
        except _DECODE_ERRORS as e:
            raise BadImageError(f"truncated or corrupt image data ({first_line(e)})") from None
    finally:
        image.close()


# ---------------------------------------------------------------------------------------------
# Crop, tensors, flips
# ---------------------------------------------------------------------------------------------


def center_crop(pil_image: Image.Image, resolution: int) -> Image.Image:
    """ADM's center crop to ``resolution`` x ``resolution``.

    Halve with a box filter while the short side is at least twice the target (cheap, alias-free
    downscaling), resize with bicubic so the short side equals the target, then crop the center.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    image = pil_image
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    new_size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    if (left, top) == (0, 0) and image.size == (resolution, resolution):
        return image
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image to a float32 tensor (3, H, W) in [-1, 1]."""
    array = np.array(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def should_flip(seed: int, epoch: int, item: int) -> bool:
    """The random horizontal flip of one draw: a pure function of (seed, epoch, item).

    Independent of worker count, worker RNG and batch layout, so resumed runs flip identically.
    """
    draw = np.random.default_rng([seed & _SEED_MASK, epoch & _SEED_MASK, item & _SEED_MASK]).random()
    return bool(draw < 0.5)


def stable_hash(text: str) -> int:
    """A process-independent integer for a string (Python's ``hash`` is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def make_sample(
    image: torch.Tensor, label: int, caption: str, index: int, skipped: list[str]
) -> dict:
    """The sample dict every dataset yields and :func:`aligntok.data.loader.collate_samples` stacks."""
    return {"image": image, "label": int(label), "caption": caption, "index": int(index), "skipped": skipped}


# ---------------------------------------------------------------------------------------------
# Map-style datasets
# ---------------------------------------------------------------------------------------------


class IndexedImageDataset(Dataset):
    """Base of the map-style datasets: bad-image replacement, center crop, flip, sample dicts.

    Subclasses implement :meth:`load` (returns ``(PIL image, label, caption)`` or raises
    :class:`BadImageError`) and :meth:`describe` (the path named in ``skipped`` messages). Indexing
    takes an int (epoch 0) or a :class:`SampleKey`. A bad image at position i is replaced by the
    first good one among i+1, i+2, ... (mod n), and each bad file passed over is listed in the
    sample's ``skipped``; the sample's ``index`` is the position actually returned.
    """

    def __init__(self, source: str, resolution: int, *, hflip: bool = False, seed: int = 0) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.num_classes = 0  # subclasses with labels set these two
        self.class_names: list[str] = []
        self.source = source
        self.resolution = resolution
        self.hflip = hflip
        self.seed = seed
        self._known_bad: dict[int, str] = {}  # per process; a cache, so results never depend on it

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[Image.Image, int, str]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"{self.source}[{index}]"

    def flip_caption(self, caption: str) -> str:
        """The caption of the horizontally flipped image; unchanged here (web captions are not rewritten)."""
        return caption

    def __getitem__(self, key: int | SampleKey) -> dict:
        index, epoch = (key.index, key.epoch) if isinstance(key, SampleKey) else (int(key), 0)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        skipped: list[str] = []
        for offset in range(n):
            position = (index + offset) % n
            reason = self._known_bad.get(position)
            if reason is None:
                try:
                    image, label, caption = self.load(position)
                except BadImageError as e:
                    reason = str(e)
                    self._known_bad[position] = reason
                else:
                    tensor = to_tensor(center_crop(image, self.resolution))
                    # The flip belongs to the draw (requested index), not to the replacement image.
                    if self.hflip and should_flip(self.seed, epoch, index):
                        tensor = tensor.flip(-1)
                        caption = self.flip_caption(caption)
                    return make_sample(tensor, label, caption, position, skipped)
            skipped.append(f"{self.describe(position)}: {reason}")
        raise ValueError(f"all {n} images in {self.source} are unreadable (first: {skipped[0]})")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _images_among(directory: str, file_names: list[str]) -> list[tuple[str, str | None]]:
    """(image path, caption path or None) for the image files among ``file_names``, sorted."""
    names = set(file_names)
    found: list[tuple[str, str | None]] = []
    for name in sorted(file_names):
        stem, ext = os.path.splitext(name)
        if _is_hidden(name) or ext.lower() not in IMAGE_EXTENSIONS:
            continue
        caption = os.path.join(directory, stem + ".txt") if stem + ".txt" in names else None
        found.append((os.path.join(directory, name), caption))
    return found


def walk_images(directory: str, visited: set[str] | None = None) -> list[tuple[str, str | None]]:
    """:func:`_images_among` over ``directory`` and its subfolders, in sorted order.

    Symbolic links to folders are followed, but every real folder is read once: ``visited`` holds the
    real paths already read (shared by the callers that scan one dataset), so a link back to an
    ancestor (``cat/up -> ..``) or a second link to the same folder adds nothing. Each folder passed
    over is logged.
    """
    visited = set() if visited is None else visited
    found: list[tuple[str, str | None]] = []
    for current, subdirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(current)
        if real in visited:
            subdirs[:] = []
            log.warning("not reading %s again: it is %s, already read (a symbolic link loop or a duplicate link)",
                        current, real)
            continue
        visited.add(real)
        subdirs[:] = sorted(d for d in subdirs if not _is_hidden(d))
        found += _images_among(current, files)
    return found


class ImageFolderDataset(IndexedImageDataset):
    """Images in a folder: ImageNet layout (one sorted subfolder per class, labels 0..K-1) or flat.

    A flat folder (no subfolders) gives label -1. A ``name.txt`` beside ``name.jpg`` is its caption.
    Hidden files and folders are ignored; files are chosen by extension (see ``IMAGE_EXTENSIONS``),
    so an unreadable file with an image extension is found here and skipped at load time.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, *, hflip: bool = False, seed: int = 0) -> None:
        root = str(root)
        super().__init__(root, resolution, hflip=hflip, seed=seed)
        if not os.path.isdir(root):
            raise ValueError(f"image folder not found: {root}")
        entries = sorted((e for e in os.scandir(root) if not _is_hidden(e.name)), key=lambda e: e.name)
        class_dirs = [e.name for e in entries if e.is_dir()]
        top_images = _images_among(root, [e.name for e in entries if e.is_file()])
        items: list[tuple[str, str | None, int]] = []
        if class_dirs:
            if top_images:
                raise ValueError(
                    f"{root} mixes images at top level (e.g. {top_images[0][0]}) with class subfolders "
                    f"(e.g. {class_dirs[0]}); use one layout"
                )
            visited = {os.path.realpath(root)}  # one real folder, one reading, one label
            for label, name in enumerate(class_dirs):
                items += [(path, caption, label) for path, caption in walk_images(os.path.join(root, name), visited)]
        else:
            items = [(path, caption, -1) for path, caption in top_images]
        self.class_names = class_dirs
        self.num_classes = len(class_dirs)
        if not items:
            hint = " (it holds .tar files: for WebDataset shards pass 'dir/{000000..000009}.tar')" if any(
                e.name.endswith(".tar") for e in entries) else f" (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            raise ValueError(f"no images found in {root}{hint}")
        self.paths = [path for path, _, _ in items]
        self.caption_paths = [caption for _, caption, _ in items]
        self.labels = [label for _, _, label in items]

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def load(self, index: int) -> tuple[Image.Image, int, str]:
        image = load_image(self.paths[index])
        caption_path = self.caption_paths[index]
        try:
            caption = Path(caption_path).read_text(encoding="utf-8", errors="replace").strip() if caption_path else ""
        except OSError as e:  # e.g. deleted after the folder was listed: the sample is unusable, not the run
            raise BadImageError(f"cannot read caption {caption_path} ({e.strerror or e})") from None
        return image, self.labels[index], caption
