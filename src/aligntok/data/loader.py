"""Per-rank batch streams that resume exactly.

Map-style datasets: the sample order is one infinite stream made of per-epoch permutations
(``torch.randperm`` seeded from (seed, epoch)). Global batch k is ``stream[k*B*W : (k+1)*B*W]`` and
rank r takes its r-th contiguous slice of B, so one process with batch 2B sees exactly what two
processes with batch B see together, and ``start_step=k`` starts at global batch k by arithmetic,
decoding nothing before it. Flips are drawn from (seed, epoch, index) inside the dataset, so neither
workers nor resuming change them.

WebDataset shards (iterable): each (rank, DataLoader worker) pair is one reader of
:class:`ShardDataset`. DataLoader hands out batches round-robin over workers (batch t of a rank comes
from worker t % num_workers), so resuming at step k rotates the workers' roles by k and makes each
reader skip the ``B * (batches it already produced)`` samples, read but not decoded. Resume is
therefore bitwise exact when world_size, num_workers and the per-rank batch are unchanged; it costs
reading at most one epoch of each reader's shards. Changing any of those three gives a different
(still valid) stream, and the 1-rank-vs-N-ranks union property does not hold for shards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from aligntok.data.images import IndexedImageDataset, SampleKey
from aligntok.data.shards import ShardDataset

_SEED_MASK = (1 << 64) - 1


def collate_samples(samples: Sequence[dict]) -> dict:
    """Stack sample dicts into a batch: tensors stacked, numbers as tensors, strings as lists.

    ``skipped`` (one list per sample) becomes one flat list for the whole batch.
    """
    batch: dict = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if key == "skipped":
            batch[key] = [entry for entries in values for entry in entries]
        elif all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = torch.stack(values)
        elif all(isinstance(v, (bool, int, float)) for v in values):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = list(values)
    return batch


def epoch_permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: a permutation of ``range(size)`` seeded from (seed, epoch)."""
    state = np.random.SeedSequence([seed & _SEED_MASK, epoch & _SEED_MASK]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state))
    return torch.randperm(size, generator=generator)


class StreamBatchSampler(Sampler[list]):
    """Batches of one rank from the infinite permutation stream, from global batch ``start_step`` on.

    Yields lists of :class:`SampleKey` (index and epoch) when ``epoch_keys`` is set, else of ints.
    """

    def __init__(self, dataset_size: int, batch_size: int, *, rank: int, world_size: int, seed: int,
                 start_step: int, epoch_keys: bool = True, shuffle: bool = True) -> None:
        if dataset_size <= 0:
            raise ValueError("cannot draw batches from an empty dataset")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step
        self.epoch_keys = epoch_keys
        self.shuffle = shuffle
        self._permutations: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # keep two: a batch usually spans at most two epochs
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = (
                epoch_permutation(self.dataset_size, self.seed, epoch) if self.shuffle else torch.arange(self.dataset_size)
            )
        return self._permutations[epoch]

    def key_at(self, position: int) -> SampleKey:
        """The sample at ``position`` of the infinite stream."""
        epoch, offset = divmod(position, self.dataset_size)
        return SampleKey(int(self._permutation(epoch)[offset]), epoch)

    def __iter__(self) -> Iterator[list]:
        step = self.start_step
        while True:
            first = (step * self.world_size + self.rank) * self.batch_size
            keys = [self.key_at(p) for p in range(first, first + self.batch_size)]
            yield keys if self.epoch_keys else [key.index for key in keys]
            step += 1


class _ShardBatchStream(IterableDataset):
    """One rank's view of a :class:`ShardDataset` for a DataLoader, resumable at ``start_step``."""

    def __init__(self, dataset: ShardDataset, batch_size: int, *, rank: int, world_size: int, seed: int,
                 start_step: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Batch t of the resumed loader comes from worker t % workers but is global batch
        # start_step + t: so this worker plays the role of worker (worker + start_step) % workers.
        role = (worker + self.start_step) % workers
        batches_done = (self.start_step - role + workers - 1) // workers
        return self.dataset.reader_stream(
            self.rank * workers + role, self.world_size * workers, self.seed, skip=batches_done * self.batch_size
        )


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    start_step: int = 0,
    shuffle: bool = True,
) -> Iterator[dict]:
    """An infinite iterator of this rank's collated batches of ``batch_size`` (the per-rank batch).

    Works on :class:`ShardDataset` and on any map-style dataset returning sample dicts; datasets
    derived from :class:`IndexedImageDataset` receive (index, epoch) keys so their flips vary per
    epoch. ``start_step=k`` starts at global batch k (see the module docstring for exactness).
    ``shuffle=False`` keeps dataset order (map-style datasets only; shards are always shuffled per epoch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if num_workers < 0 or start_step < 0:
        raise ValueError(f"num_workers={num_workers} and start_step={start_step} must be >= 0")
    # An explicit generator: otherwise starting the iterator draws a worker seed from the global RNG,
    # shifting the model's random stream by one draw whenever a loader is (re)created, e.g. on resume.
    common = {
        "num_workers": num_workers,
        "collate_fn": collate_samples,
        "pin_memory": torch.cuda.is_available(),
        "generator": torch.Generator().manual_seed(seed),
    }
    if isinstance(dataset, ShardDataset):
        stream = _ShardBatchStream(dataset, batch_size, rank=rank, world_size=world_size, seed=seed,
                                   start_step=start_step)
        return iter(DataLoader(stream, batch_size=batch_size, **common))
    if isinstance(dataset, IterableDataset):
        raise TypeError(f"build_loader: unsupported iterable dataset {type(dataset).__name__}")
    sampler = StreamBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed,
                                 start_step=start_step, epoch_keys=isinstance(dataset, IndexedImageDataset),
                                 shuffle=shuffle)
    return iter(DataLoader(dataset, batch_sampler=sampler, **common))
