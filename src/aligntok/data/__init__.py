"""The data layer: every image that enters aligntok comes through :func:`build_dataset`.

Data specs (one string, used everywhere a command takes data):

- ``builtin:NAME``: a built-in synthetic dataset generated on the fly (``builtin:shapes``, ``builtin:scenes``);
- a folder of images: one subfolder per class (sorted, labels 0..K-1, as ImageNet) or flat (label -1);
- WebDataset shards: ``dir/{000000..000127}.tar`` or a single ``.tar`` path;
- ``hf:NAME[:SPLIT]``: a Hugging Face dataset's parquet files (Hub id or local copy), streamed as shards.

Samples are dicts: ``image`` float32 (3, R, R) in [-1, 1], ``label`` int (-1 unknown), ``caption``
str, ``index`` int (-1 for shards) and ``skipped`` (``"path: reason"`` for each bad file replaced to
produce this sample). :func:`build_loader` turns a dataset into an infinite, exactly resumable
stream of per-rank batches.
"""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from aligntok.data.builtin import BUILTIN_DATASETS, ShapesDataset
from aligntok.data.images import (
    BadImageError,
    ImageFolderDataset,
    IndexedImageDataset,
    SampleKey,
    center_crop,
    load_image,
    to_tensor,
)
from aligntok.data.loader import build_loader, collate_samples
from aligntok.data.scenes import ScenesDataset
from aligntok.data.shards import ShardDataset, is_shard_spec, write_shards

BUILTIN_DATASETS["scenes"] = ScenesDataset  # registered here: scenes.py builds on builtin.py

__all__ = [
    "BUILTIN_DATASETS", "BadImageError", "ImageFolderDataset", "IndexedImageDataset", "SampleKey",
    "ScenesDataset", "ShapesDataset", "ShardDataset", "build_dataset", "build_loader", "center_crop", "collate_samples",
    "load_image", "to_tensor", "write_shards",
]

_BUILTIN_PREFIX = "builtin:"


def build_dataset(
    spec: str, resolution: int, *, hflip: bool = False, seed: int = 0, builtin_size: int = 10000
) -> Dataset:
    """The dataset a data spec names, yielding ``resolution`` x ``resolution`` samples.

    ``seed`` fixes the random flips (and, for ``builtin:``, the images themselves: another seed is
    another dataset, e.g. a held-out set); ``builtin_size`` is the length of a ``builtin:`` dataset.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if spec.startswith(_BUILTIN_PREFIX):
        name = spec[len(_BUILTIN_PREFIX):]
        if name not in BUILTIN_DATASETS:
            raise ValueError(f"unknown built-in dataset {spec!r}; available: "
                             f"{', '.join(_BUILTIN_PREFIX + n for n in BUILTIN_DATASETS)}")
        return BUILTIN_DATASETS[name](builtin_size, resolution, hflip=hflip, seed=seed)
    if spec.startswith("hf:"):
        from aligntok.data.parquet import HubDataset  # pyarrow only when asked for

        return HubDataset(spec, resolution, hflip=hflip, seed=seed)
    if is_shard_spec(spec):
        return ShardDataset(spec, resolution, hflip=hflip, seed=seed)
    if os.path.isdir(spec):
        return ImageFolderDataset(spec, resolution, hflip=hflip, seed=seed)
    raise ValueError(
        f"data spec {spec!r} is none of: builtin:NAME ({', '.join(BUILTIN_DATASETS)}), an existing folder "
        "of images, WebDataset shards 'dir/{000000..000099}.tar', a .tar path or hf:DATASET[:SPLIT]"
    )
