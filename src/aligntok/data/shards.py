"""WebDataset shards: writing them, and reading them as deterministic, resumable sample streams.

A shard is a tar file of samples ``KEY.png`` (or jpg/webp/...), ``KEY.cls`` (integer label, optional)
and ``KEY.txt`` (caption, optional). :func:`write_shards` also writes ``dataset.json`` beside the
shards (sample counts per shard, number of classes, class names); readers use it when present.

Reading (see :meth:`ShardDataset.reader_stream`): the shards are split among the readers (one per
rank and DataLoader worker); a reader repeats its shards forever, each epoch in an order and through
a shuffle buffer that are pure functions of (seed, reader, epoch). When there are fewer shards than
readers, every reader reads all shards and keeps every readers-th sample instead. A bad image at
stream position p is replaced by the next good sample of the stream (positions p+1, p+2, ...), as
in the map-style datasets, so positions map one-to-one onto the raw stream and resuming can skip raw
samples without decoding them.
"""

from __future__ import annotations

import collections
import io
import json
import os
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset
from webdataset import ShardWriter
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from aligntok.data.images import (
    BadImageError,
    center_crop,
    load_image,
    make_sample,
    should_flip,
    stable_hash,
    to_rgb,
    to_tensor,
)
from aligntok.io import write_text_atomically

#: Metadata file written beside the shards by :func:`write_shards`.
SHARD_META_FILE = "dataset.json"
#: Sample entries holding the encoded image, in order of preference.
IMAGE_KEYS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "ppm")
#: Samples held in each reader's shuffle buffer (raw bytes, not decoded images).
DEFAULT_SHUFFLE_BUFFER = 512

_SEED_MASK = (1 << 64) - 1


def is_shard_spec(spec: str) -> bool:
    """Whether a data spec names WebDataset shards: a brace pattern or a path ending in .tar."""
    return spec.endswith(".tar") or ("{" in spec and ".." in spec and "}" in spec)


def expand_shard_spec(spec: str) -> list[str]:
    """The shard paths of ``dir/{000000..000127}.tar`` (or one .tar path); all must exist."""
    paths = expand_urls(spec)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"shard spec {spec!r}: {len(missing)} of {len(paths)} shards not found (first: {missing[0]})")
    return paths


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _to_pil(image: Any) -> Image.Image:
    """A PIL image, a (3,H,W) tensor (float in [-1,1] or uint8) or an (H,W,3) uint8 array as PIL RGB."""
    if isinstance(image, Image.Image):
        return to_rgb(image)  # the readers' conversion (alpha over white, 16-bit scaled), not PIL's clip
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, H, W), got {tuple(image.shape)}")
        if image.is_floating_point():
            image = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        image = image.permute(1, 2, 0).cpu().numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image array must be uint8 (H, W, 3), got {array.dtype} {array.shape}")
    return Image.fromarray(array, mode="RGB")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(
    samples_iterable: Iterable[dict],
    pattern: str,
    maxcount: int,
    *,
    class_names: list[str] | None = None,
) -> list[str]:
    """Write samples to WebDataset shards ``pattern % 0, pattern % 1, ...`` and ``dataset.json``.

    Each sample is a dict with ``image`` (PIL image, (3,H,W) tensor in [-1,1] or uint8, or (H,W,3)
    uint8 array), and optionally ``label`` (int; -1 or absent for none) and ``caption`` (str).
    Images are stored losslessly as PNG, labels as ``cls``, captions as ``txt``, and width, height and caption
    as ``json`` (img2dataset's layout). Returns the shard
    paths written; read them back with the spec ``dir/{000000..00000N}.tar``.
    """
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    try:
        distinct = pattern % 0 != pattern % 1
    except TypeError:
        distinct = False
    if not distinct:
        raise ValueError(f"shard pattern {pattern!r} needs one integer field such as %06d (e.g. out/%06d.tar)")
    iterator = iter(samples_iterable)
    first = next(iterator, None)
    if first is None:
        raise ValueError("write_shards: no samples to write")
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)

    counts: dict[str, int] = collections.Counter()
    top_label = -1
    with ShardWriter(pattern, maxcount=maxcount, maxsize=float("inf"), verbose=0) as writer:
        for number, sample in enumerate(_chain(first, iterator)):
            if "image" not in sample:
                raise ValueError(f"write_shards: sample {number} has no 'image'")
            label = int(sample.get("label", -1))
            caption = str(sample.get("caption", ""))
            image = _to_pil(sample["image"])
            record = {"__key__": f"{number:09d}", "png": _png_bytes(image)}
            # img2dataset's metadata: sizes let aspect-ratio buckets be assigned without decoding
            record["json"] = json.dumps({"width": image.width, "height": image.height, "caption": caption}).encode()
            if label >= 0:
                record["cls"] = str(label).encode()
                top_label = max(top_label, label)
            if caption:
                record["txt"] = caption.encode("utf-8")
            writer.write(record)
            counts[writer.fname] += 1
    paths = list(counts)  # in writing order
    num_classes = len(class_names) if class_names else top_label + 1
    meta = {
        "num_samples": sum(counts.values()),
        "num_classes": num_classes,
        "class_names": list(class_names or []),
        "shard_sizes": {os.path.basename(path): count for path, count in counts.items()},
    }
    write_text_atomically(Path(paths[0]).parent / SHARD_META_FILE, json.dumps(meta, indent=1))
    return paths


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_shard(path: str) -> Iterator[dict]:
    """Raw samples (``__key__``, ``__url__`` and undecoded entries) of one shard, in file order.

    A corrupt or truncated tar ends its shard with a warning instead of stopping the run, after the last
    sample whose files were read whole; the same happens in every epoch, so streams stay deterministic.
    """
    damage: list[BaseException] = []

    def entries() -> Iterator[dict]:
        # The damage ends the entries, not the grouping: the sample being grouped is still yielded.
        try:
            with open(path, "rb") as stream:
                yield from ({**entry, "__url__": path} for entry in tar_file_iterator(stream))
        except (tarfile.TarError, OSError, ValueError) as e:
            damage.append(e)

    yield from group_by_keys(entries())
    if damage:
        e = damage[0]
        warnings.warn(f"shard {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                      "skipping the rest of it", stacklevel=2)


def _count_samples(path: str) -> int:
    """Samples in one shard from its tar headers only (seeks over the data); a member whose data the file
    does not hold whole is not counted, as :func:`_read_shard` cannot read it."""
    count, previous = 0, None
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                if not member.isreg():
                    continue
                if member.offset_data + member.size > size:
                    break
                prefix, _ = base_plus_ext(member.name)
                if prefix is not None and prefix != previous and not os.path.basename(member.name).startswith("__"):
                    count, previous = count + 1, prefix
    except (tarfile.TarError, OSError):
        pass  # counted up to the damage, as _read_shard reads up to it
    return count


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([w & _SEED_MASK for w in words])


class ShardDataset(IterableDataset):
    """WebDataset shards as an infinite, deterministic stream of sample dicts (``index`` is -1).

    Iterating it directly gives the stream of rank 0 of 1 (split among DataLoader workers);
    :func:`aligntok.data.build_loader` uses :meth:`reader_stream` for ranks, workers and resume.
    """

    def __init__(
        self,
        spec: str,
        resolution: int,
        *,
        hflip: bool = False,
        seed: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.source = spec
        self.shards = expand_shard_spec(spec)
        self.resolution = resolution
        self.hflip = hflip
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        meta_path = Path(self.shards[0]).parent / SHARD_META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.class_names: list[str] = list(meta.get("class_names", []))
        self.num_classes: int = int(meta.get("num_classes", 0))  # 0: unknown without dataset.json
        self._known_sizes: dict[str, int] = dict(meta.get("shard_sizes", {}))

    def shard_size(self, path: str) -> int:
        """Samples in one shard: from dataset.json when it lists the shard, else from tar headers."""
        name = os.path.basename(path)
        if name not in self._known_sizes:
            self._known_sizes[name] = _count_samples(path)
        return self._known_sizes[name]

    # -- the raw (undecoded) stream of one reader ----------------------------------------------

    def read_raw(self, path: str) -> Iterator[dict]:
        """Raw samples of one shard in file order (other shard formats override this)."""
        return _read_shard(path)

    def _assignment(self, reader: int, readers: int) -> tuple[list[str], int, int, int]:
        """(shards, group id, slot, sharers): which shards a reader reads and which samples it keeps."""
        if len(self.shards) >= readers:
            return self.shards[reader::readers], reader, 0, 1
        return self.shards, -1, reader, readers

    def _group_epoch(self, shards: list[str], order_seed: int, group: int, epoch: int) -> Iterator[dict]:
        """One epoch of a shard group: shards in a seeded order, samples through a seeded buffer."""
        rng = _rng(order_seed, group, epoch)
        buffer: list[dict] = []
        for shard_number in rng.permutation(len(shards)):
            for raw in self.read_raw(shards[shard_number]):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(raw)
                    continue
                slot = int(rng.integers(len(buffer)))
                buffer[slot], raw = raw, buffer[slot]
                yield raw
        for slot in rng.permutation(len(buffer)):
            yield buffer[slot]

    def reader_epoch_length(self, reader: int, readers: int) -> int:
        shards, _, slot, sharers = self._assignment(reader, readers)
        total = sum(self.shard_size(s) for s in shards)
        return len(range(slot, total, sharers))

    def _raw_stream(self, reader: int, readers: int, order_seed: int, skip: int) -> Iterator[tuple[int, dict]]:
        """(epoch, raw sample) forever, after dropping the first ``skip`` samples undecoded."""
        shards, group, slot, sharers = self._assignment(reader, readers)
        epoch = 0
        if skip:
            length = self.reader_epoch_length(reader, readers)
            if length == 0:
                raise ValueError(f"shards {self.source} hold no samples for reader {reader} of {readers}")
            epoch, skip = divmod(skip, length)
        while True:
            kept = 0
            for position, raw in enumerate(self._group_epoch(shards, order_seed, group, epoch)):
                if position % sharers != slot:
                    continue
                kept += 1
                if skip:
                    skip -= 1
                    continue
                yield epoch, raw
            if kept == 0:
                raise ValueError(f"shards {self.source} hold no samples for reader {reader} of {readers}")
            epoch += 1

    # -- decoding ------------------------------------------------------------------------------

    def _decode(self, raw: dict, epoch: int) -> dict | str:
        """A sample dict (``skipped`` empty), or the reason the raw sample is unusable."""
        name = f"{raw['__url__']}/{raw['__key__']}"
        image_key = next((k for k in IMAGE_KEYS if k in raw), None)
        if image_key is None:
            return f"{name}: no image entry (looked for {', '.join(IMAGE_KEYS)})"
        try:
            image = load_image(raw[image_key])
            label = int(raw["cls"].decode().strip()) if "cls" in raw else -1
        except BadImageError as e:
            return f"{name}: {e}"
        except (ValueError, UnicodeDecodeError):
            return f"{name}: cls entry is not an integer"
        caption = raw["txt"].decode("utf-8", errors="replace").strip() if "txt" in raw else ""
        tensor = to_tensor(center_crop(image, self.resolution))
        if self.hflip and should_flip(self.seed, epoch, stable_hash(name)):
            tensor = tensor.flip(-1)
        return make_sample(tensor, label, caption, -1, [])

    def reader_stream(self, reader: int, readers: int, order_seed: int, skip: int = 0) -> Iterator[dict]:
        """The decoded samples of one reader, from position ``skip`` on (earlier ones not decoded).

        Position p yields the first good sample among raw positions p, p+1, ...; the bad ones
        passed over are listed in its ``skipped``. A stream with no good sample in a whole epoch
        is an error rather than an endless search.
        """
        raw_stream = self._raw_stream(reader, readers, order_seed, skip)
        ahead: collections.deque[tuple[int, dict | str]] = collections.deque()  # decoded look-ahead
        while True:
            skipped: list[str] = []
            depth = 0
            while True:
                if depth == len(ahead):
                    epoch, raw = next(raw_stream)
                    ahead.append((epoch, self._decode(raw, epoch)))
                epoch, decoded = ahead[depth]
                if isinstance(decoded, dict):
                    break
                skipped.append(decoded)
                if epoch >= ahead[0][0] + 2:
                    raise ValueError(f"no readable image in a whole epoch of {self.source} (e.g. {skipped[0]})")
                depth += 1
            sample = ahead[depth][1]
            ahead.popleft()
            yield {**sample, "skipped": skipped} if skipped else sample

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.reader_stream(worker, workers, self.seed)
