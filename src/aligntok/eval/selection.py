"""Which images an evaluation reads, and this rank's share of them (``aligntok evaluate recon|probe``).

:func:`select_images` takes all of a dataset, or with ``num`` a seeded random subset of a map-style dataset
(an image folder's first N files would be its first classes), read in dataset order. Unreadable images are
not replaced by their neighbours (that would count an image twice): :func:`readable_mask` marks them so they
are skipped, counted and listed. WebDataset shards are read one epoch per reader (one reader per rank and
DataLoader worker); with ``num`` below the dataset size each reader contributes its share, so that subset
depends on the number of processes and workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from itertools import islice

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from aligntok.data import ShardDataset, collate_samples
from aligntok.data.loader import epoch_permutation
from aligntok.training.distributed import broadcast_object, gather_objects

#: Skipped-image messages kept in a result (the count is always exact).
MAX_LISTED_SKIPPED = 100
#: Fields added to every sample read for evaluation: its selection key, and the name of the unreadable image it
#: stands in for ("" when it is itself readable).
KEY_FIELD, _BAD = "eval_key", "eval_bad_input"


def _mark(sample: dict, key: int) -> dict:
    """A sample with its selection key and, when it replaces an unreadable image, that image's name."""
    return {**sample, KEY_FIELD: key, _BAD: sample["skipped"][0] if sample["skipped"] else ""}


class _SelectedImages(Dataset):
    """The images of a map-style dataset at ``positions`` (the key of each is its position)."""

    def __init__(self, dataset: Dataset, positions: Sequence[int]) -> None:
        self.dataset = dataset
        self.positions = list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int) -> dict:
        position = self.positions[item]
        return _mark(self.dataset[position], position)


class _SelectedShardSamples(IterableDataset):
    """This rank's share of one epoch of shards: reader i yields its first ``quotas[i]`` samples.

    Readers are numbered ``rank * workers + worker`` out of ``world_size * workers``, as in
    :func:`aligntok.data.build_loader`; a sample's key is ``reader * stride + position``.
    """

    def __init__(self, dataset: ShardDataset, quotas: Sequence[int], *, rank: int, workers: int, stride: int) -> None:
        self.dataset = dataset
        self.quotas = list(quotas)
        self.rank = rank
        self.workers = workers
        self.stride = stride

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.workers:
            raise ValueError(f"shard selection made for {self.workers} workers is read by {workers}")
        reader = self.rank * workers + worker
        stream = self.dataset.reader_stream(reader, len(self.quotas), self.dataset.seed)
        for position, sample in enumerate(islice(stream, self.quotas[reader])):
            yield _mark(sample, reader * self.stride + position)


@dataclasses.dataclass
class ImageSelection:
    """The images an evaluation reads: over all ranks, and this rank's share as a dataset."""

    dataset: Dataset  #: this rank's images as sample dicts (a map-style subset or a shard stream)
    keys: list[int]  #: the key of every selected image, all ranks (positions; for shards reader*stride+i)
    per_rank: list[int]  #: selected images on each rank
    available: int  #: images in the whole dataset
    order: str  #: how the images were chosen, for the provenance

    @property
    def num_selected(self) -> int:
        return len(self.keys)


def _proportional_split(total: int, weights: Sequence[int]) -> list[int]:
    """Integers summing to ``total`` in proportion to ``weights`` (largest remainders), each <= its weight."""
    whole = sum(weights)
    shares = [total * w // whole for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def select_images(
    dataset: Dataset, num: int | None, *, rank: int, world_size: int, seed: int = 0, num_workers: int = 0
) -> ImageSelection:
    """Choose ``num`` images (all when None) of ``dataset`` and this rank's disjoint share of them."""
    if num is not None and num < 1:
        raise ValueError(f"--num must be positive, got {num}")
    if isinstance(dataset, ShardDataset):
        workers = max(1, num_workers)
        readers = world_size * workers
        lengths = [dataset.reader_epoch_length(reader, readers) for reader in range(readers)]
        available = sum(lengths)
        wanted = _check_count(num, available, dataset.source)
        quotas = _proportional_split(wanted, lengths)
        stride = max(lengths)
        keys = [reader * stride + i for reader, quota in enumerate(quotas) for i in range(quota)]
        order = f"one epoch of the shard stream (seed {dataset.seed}) over {readers} readers"
        if wanted < available:
            order += ", each reader's first images in proportion to its share (depends on processes and workers)"
        return ImageSelection(
            dataset=_SelectedShardSamples(dataset, quotas, rank=rank, workers=workers, stride=stride),
            keys=keys,
            per_rank=[sum(quotas[r * workers : (r + 1) * workers]) for r in range(world_size)],
            available=available,
            order=order,
        )
    available = len(dataset)
    wanted = _check_count(num, available, getattr(dataset, "source", type(dataset).__name__))
    if wanted < available:
        positions = sorted(epoch_permutation(available, seed, 0)[:wanted].tolist())
        order = f"seeded random subset (seed {seed}) of {available} images, read in dataset order"
    else:
        positions = list(range(available))
        order = "all images, in dataset order"
    return ImageSelection(
        dataset=_SelectedImages(dataset, positions[rank::world_size]),
        keys=positions,
        per_rank=[len(positions[r::world_size]) for r in range(world_size)],
        available=available,
        order=order,
    )


def _check_count(num: int | None, available: int, source: str) -> int:
    if available == 0:
        raise ValueError(f"{source}: the dataset holds no images")
    if num is not None and num > available:
        raise ValueError(f"--num {num} is more than the {available} images of {source}")
    return available if num is None else num


def selection_loader(selection: ImageSelection, batch_size: int, num_workers: int) -> DataLoader:
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {num_workers}")
    return DataLoader(
        selection.dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=torch.cuda.is_available(),
    )


def readable_mask(batch: dict) -> tuple[torch.Tensor, list[str]]:
    """(mask of the samples that are themselves readable images, names of the unreadable ones)."""
    bad = batch[_BAD]
    return torch.tensor([not name for name in bad], dtype=torch.bool), [name for name in bad if name]


def gather_skipped(skipped: list[str]) -> list[str]:
    """Every rank's skipped-image messages, on every rank."""
    parts = gather_objects(skipped)
    return broadcast_object([m for part in parts for m in part] if parts is not None else None)


def check_every_rank_has_images(selection: ImageSelection, source: str) -> None:
    empty = [rank for rank, count in enumerate(selection.per_rank) if count == 0]
    if empty:
        raise ValueError(
            f"{selection.num_selected} images of {source} cannot be split over {len(selection.per_rank)} "
            f"processes (rank {empty[0]} would get none): use more images or fewer processes"
        )
