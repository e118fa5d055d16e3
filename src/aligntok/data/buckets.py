"""Aspect-ratio buckets: constant-area image sizes, nearest-ratio assignment, and a resumable batch sampler.

**Table** (:func:`bucket_table`): for each ratio W/H, the size of about ``side x side`` pixels with both
sides multiples of ``multiple`` (the tokenizer's stride times the packing: 16 px for AlignTok f16 and for
an f8 VAE packed 2x2), duplicates removed (at 256 px, 4:3 and 5:4 round to the same 288x224).

**Assignment** (:func:`assign_buckets`): each image goes to the bucket nearest its aspect ratio in log
space, from its size alone: image headers for folders (PIL reads no pixels), ``KEY.json`` width/height
for WebDataset shards (:func:`shard_sizes` and :class:`IndexedShards` read only the .json members, never
decode an image; :class:`IndexedShards` gives bucketing random access into the tars).

**Sampler** (:class:`BucketBatchSampler`): in epoch e each bucket's members are permuted with a seed from
(seed, e, bucket) and cut into global batches of ``batch_size * world_size``; a bucket's remainder sits
out that epoch (it is another remainder in the next one, whose permutation differs); the epoch's batches
are shuffled with a seed from (seed, e). Every epoch therefore has the same number of batches, so global
batch k maps to (epoch, position) by arithmetic: resuming at step k decodes nothing before it, and is
exact. Rank r takes the r-th slice of each global batch, so every rank draws from the same bucket at
every step, and one process at batch 2B sees what two ranks at B see together.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from aligntok.data.images import IndexedImageDataset, SampleKey, should_flip, to_tensor

_SEED_MASK = (1 << 64) - 1
DEFAULT_RATIOS = ("1/1", "4/5", "5/4", "3/4", "4/3", "2/3", "3/2", "9/16", "16/9")  # the paper's 512-px set (W/H)


def parse_ratio(text: str) -> float:
    """"W/H" (or "W:H" from Python; YAML reads an unquoted 4:5 as the base-60 number 245) -> W / H."""
    try:
        w, h = (float(part) for part in str(text).replace(":", "/").split("/"))
    except ValueError:
        raise ValueError(f"aspect ratio {text!r} is not of the form W/H (e.g. 4/5)") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"aspect ratio {text!r} must be positive")
    return w / h


def bucket_table(side: int, ratios: Sequence[str] = DEFAULT_RATIOS, multiple: int = 16) -> list[tuple[int, int]]:
    """Unique (height, width) buckets of area ~``side**2``, multiples of ``multiple``, sorted by aspect ratio."""
    if side <= 0 or multiple <= 0 or side % multiple:
        raise ValueError(f"side={side} must be a positive multiple of multiple={multiple}")
    buckets = set()
    for text in ratios:
        r = parse_ratio(text)
        width = max(multiple, round(side * math.sqrt(r) / multiple) * multiple)
        height = max(multiple, round(side / math.sqrt(r) / multiple) * multiple)
        buckets.add((height, width))
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def assign_buckets(sizes: Sequence[tuple[int, int]], buckets: Sequence[tuple[int, int]]) -> list[int]:
    """For each (width, height), the index of the bucket nearest its aspect ratio (log space)."""
    logs = np.log([w / h for h, w in buckets])
    return [int(np.argmin(np.abs(logs - math.log(w / h)))) for w, h in sizes]


def image_sizes(paths: Sequence[str]) -> list[tuple[int, int]]:
    """(width, height) of each image file from its header (no pixels decoded)."""
    from PIL import Image

    sizes = []
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
        except OSError:
            sizes.append((1, 1))  # unreadable: assigned to the squarest bucket, skipped at load time
    return sizes


def shard_sizes(tar_path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(key, width, height) of every sample of a WebDataset tar with a valid ``KEY.json`` holding width and
    height (img2dataset's layout), in tar order; only the .json members are read."""
    found = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".json"):
                continue
            try:
                meta = json.loads(tar.extractfile(member).read())
                width, height = int(meta["width"]), int(meta["height"])
            except (ValueError, KeyError, TypeError):
                continue
            if width > 0 and height > 0:
                found.append((member.name[: -len(".json")], width, height))
    return found


def cover_crop(image, height: int, width: int):
    """Resize (bicubic) so the image covers height x width, then center-crop to it."""
    from PIL import Image

    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _seeded(*parts: int) -> torch.Generator:
    state = np.random.SeedSequence([p & _SEED_MASK for p in parts]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class BucketBatchSampler(Sampler[list]):
    """This rank's batches (lists of :class:`SampleKey`) from global batch ``start_step`` on; see module doc."""

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0) -> None:
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.start_step = seed, start_step
        members: dict[int, list[int]] = {}
        for index, bucket in enumerate(bucket_ids):
            members.setdefault(int(bucket), []).append(index)
        self.members = {b: torch.tensor(m) for b, m in sorted(members.items())}
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = sum(len(m) // self.global_batch for m in self.members.values())
        if self.batches_per_epoch == 0:
            raise ValueError(f"no bucket holds a global batch of {self.global_batch} images "
                             f"(bucket sizes: {({b: len(m) for b, m in self.members.items()})})")
        self._epoch: tuple[int, list[tuple[int, torch.Tensor]]] | None = None

    def epoch_batches(self, epoch: int) -> list[tuple[int, torch.Tensor]]:
        """(bucket, global batch of indices) of every batch of ``epoch``, in order."""
        if self._epoch is None or self._epoch[0] != epoch:
            batches = []
            for bucket, members in self.members.items():
                order = members[torch.randperm(len(members), generator=_seeded(self.seed, epoch, bucket))]
                for start in range(0, len(order) - self.global_batch + 1, self.global_batch):
                    batches.append((bucket, order[start : start + self.global_batch]))
            shuffle = torch.randperm(len(batches), generator=_seeded(self.seed, epoch, -1))
            self._epoch = (epoch, [batches[int(i)] for i in shuffle])
        return self._epoch[1]

    def global_batch_at(self, step: int) -> tuple[int, list[SampleKey]]:
        """(bucket, keys) of global batch ``step``."""
        epoch, position = divmod(step, self.batches_per_epoch)
        bucket, indices = self.epoch_batches(epoch)[position]
        return bucket, [SampleKey(int(i), epoch) for i in indices]

    def __iter__(self) -> Iterator[list]:
        step = self.start_step
        while True:
            _, keys = self.global_batch_at(step)
            yield keys[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            step += 1


class BucketedImages(Dataset):
    """A map-style image dataset (:class:`~aligntok.data.images.IndexedImageDataset`) served at bucket sizes:
    sample i is cover-resized and center-cropped to its bucket, flipped by (seed, epoch, index) with its
    caption rewritten as the base dataset does."""

    def __init__(self, base, buckets: Sequence[tuple[int, int]], bucket_ids: Sequence[int], *, hflip: bool, seed: int) -> None:
        self.base, self.buckets, self.bucket_ids = base, list(buckets), list(bucket_ids)
        self.hflip, self.seed = hflip, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: SampleKey | int) -> dict:
        from aligntok.data.images import BadImageError

        index, epoch = (key.index, key.epoch) if isinstance(key, SampleKey) else (int(key), 0)
        bucket = self.bucket_ids[index]
        same = [i for i, b in enumerate(self.bucket_ids) if b == bucket]  # a bad image's stand-ins keep the bucket
        start = same.index(index)
        skipped: list[str] = []
        for position in same[start:] + same[:start]:
            try:
                image, label, caption = self.base.load(position)
                break
            except BadImageError as e:
                skipped.append(f"{self.base.describe(position)}: {e}")
        else:
            raise ValueError(f"every image of bucket {self.buckets[bucket]} is unreadable (first: {skipped[0]})")
        height, width = self.buckets[bucket]
        tensor = to_tensor(cover_crop(image.convert("RGB"), height, width))
        if self.hflip and should_flip(self.seed, epoch, index):  # the flip belongs to the draw
            tensor, caption = tensor.flip(-1), self.base.flip_caption(caption)
        return {"image": tensor, "label": int(label), "caption": caption, "index": position, "skipped": skipped}


class IndexedShards(IndexedImageDataset):
    """WebDataset tars with random access, for bucketing: each sample's members are located once from the
    tar headers (no payload read), then read by seeking. Sizes come from ``KEY.json`` (img2dataset's width
    and height) without decoding; samples without one are sized from their image header."""

    def __init__(self, spec: str, resolution: int, *, hflip: bool = False, seed: int = 0) -> None:
        from webdataset.tariterators import base_plus_ext

        from aligntok.data.shards import IMAGE_KEYS, expand_shard_spec

        super().__init__(spec, resolution, hflip=hflip, seed=seed)
        self.samples: list[tuple[str, str, dict[str, tuple[int, int]]]] = []  # (tar, key, ext -> (offset, size))
        for path in expand_shard_spec(spec):
            members: dict[str, dict[str, tuple[int, int]]] = {}
            with tarfile.open(path) as tar:
                for member in tar:
                    key, ext = base_plus_ext(member.name)
                    if member.isfile() and key and ext:
                        members.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
            self.samples += [(path, key, found) for key, found in members.items() if any(e in found for e in IMAGE_KEYS)]
        if not self.samples:
            raise ValueError(f"no image samples found in the shards {spec}")
        self._image_keys = IMAGE_KEYS

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        return f"{self.samples[index][0]}/{self.samples[index][1]}"

    def _read(self, index: int, ext: str) -> bytes:
        path, _, found = self.samples[index]
        offset, size = found[ext]
        with open(path, "rb") as file:
            file.seek(offset)
            return file.read(size)

    def sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every sample: from KEY.json, else the image header; (1, 1) when unreadable."""
        from PIL import Image

        sizes = []
        for index, (_, _, found) in enumerate(self.samples):
            try:
                meta = json.loads(self._read(index, "json"))
                sizes.append((int(meta["width"]), int(meta["height"])))
                continue
            except (KeyError, ValueError, TypeError):
                pass
            try:
                ext = next(e for e in self._image_keys if e in found)
                with Image.open(io.BytesIO(self._read(index, ext))) as image:
                    sizes.append(image.size)
            except OSError:
                sizes.append((1, 1))
        return sizes

    def load(self, index: int):
        from aligntok.data.images import load_image

        found = self.samples[index][2]
        image = load_image(self._read(index, next(e for e in self._image_keys if e in found)))
        caption = self._read(index, "txt").decode("utf-8", errors="replace").strip() if "txt" in found else ""
        label = -1
        if "cls" in found:
            try:
                label = int(self._read(index, "cls").decode().strip())
            except ValueError:
                label = -1
        return image, label, caption


def bucketed_loader_factory(dataset, spec: str, resolution: int, ratios: Sequence[str], multiple: int, batch_size: int,
                            *, rank: int, world_size: int, seed: int, hflip: bool, num_workers: int):
    """``start_step -> batches`` drawing each global batch from one bucket: ``dataset`` (an image folder,
    builtin:NAME or WebDataset shards of ``spec``, without flips) served at the bucket sizes of ``ratios``."""
    import logging

    from torch.utils.data import DataLoader

    from aligntok.data.loader import collate_samples
    from aligntok.data.shards import ShardDataset

    if isinstance(dataset, ShardDataset):  # random access into the tars; sizes from KEY.json
        dataset = IndexedShards(spec, resolution, seed=seed)
    table = bucket_table(resolution, ratios, multiple)
    if isinstance(dataset, IndexedShards):
        sizes = dataset.sizes()
    elif getattr(dataset, "paths", None) is not None:
        sizes = image_sizes(dataset.paths)
    else:  # builtin: square
        sizes = [(resolution, resolution)] * len(dataset)
    ids = assign_buckets(sizes, table)
    histogram = {f"{h}x{w}": ids.count(i) for i, (h, w) in enumerate(table)}
    logging.getLogger(__name__).info("aspect-ratio buckets (HxW: images): %s", histogram)
    data = BucketedImages(dataset, table, ids, hflip=hflip, seed=seed)

    def factory(start_step: int):
        sampler = BucketBatchSampler(ids, batch_size, rank=rank, world_size=world_size, seed=seed, start_step=start_step)
        return iter(DataLoader(data, batch_sampler=sampler, collate_fn=collate_samples, num_workers=num_workers,
                               generator=torch.Generator().manual_seed(seed)))

    return factory
