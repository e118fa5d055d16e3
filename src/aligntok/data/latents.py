"""The latent cache: a dataset encoded once by a tokenizer (plain and flipped), and its statistics.

:func:`cache_latents` (the ``aligntok cache-latents`` command) cuts the dataset into units (index
ranges of ``shard_size`` images for folders and ``builtin:``; one unit per tar for WebDataset shards)
and writes each unit as one safetensors shard under a temporary name that is renamed when complete
(:func:`aligntok.io.save_safetensors`), so a kill or a full disk never leaves half a shard:

    CACHE/plan.json                 the settings the shards were made with (a re-run must match them)
    CACHE/shard-00000.safetensors   latents (n, C, h, w) fp32, latents_flip (the horizontally flipped
                                    image's latents), labels (n,) int64, indices (n,) int64 (dataset
                                    index; for tars the position in the tar), and stat_count / stat_mean /
                                    stat_m2 (float64 per-channel moments of both latents); metadata: the
                                    files skipped as unreadable
    CACHE/cache.json                written last: shards, per-channel mean and std, skipped files

Under torchrun the ranks take disjoint units (round-robin over the units still missing), so nothing is
encoded twice. Each rank reads all its units through one DataLoader (``num_workers`` processes that keep
loading across shard boundaries; tars are decoded one per worker). Re-running the same command keeps
finished shards and encodes only the missing ones. The per-channel mean and std are combined from the
shards' float64 moments (Chan et al.'s parallel update), over every latent position of both the plain
and the flipped latents, i.e. over the distribution the DiT trains on; std is the unbiased one (as
``torch.std``). They are recorded in the cache's metadata and in the tokenizer's config
(``set_latent_stats`` + ``save_pretrained``, atomically), where the rest of aligntok reads them.

:class:`aligntok.data.latent_dataset.LatentDataset` reads a finished cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    Sampler,
    get_worker_info,
)

from aligntok.data import build_dataset, collate_samples
from aligntok.data.latent_dataset import (
    CACHE_FILE,
    FORMAT_NAME,
    SHARD_PATTERN,
    ChannelMoments,
)
from aligntok.data.shards import ShardDataset
from aligntok.io import save_safetensors, write_text_atomically

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
TOKENIZER_COPY = "tokenizer"  # the aligntok copy of a tokenizer given as a hub id or diffusers VAE
MAX_LISTED_SKIPS = 1000  # skipped files named in cache.json (all are counted)


# ---------------------------------------------------------------------------------------------
# Units of work
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Unit:
    """One shard of the cache: a range of dataset indices, or one input tar."""

    number: int
    start: int = 0
    stop: int = 0
    tar: str | None = None

    @property
    def file_name(self) -> str:
        return SHARD_PATTERN.format(self.number)


def _plan_units(dataset: Dataset, shard_size: int) -> list[_Unit]:
    if isinstance(dataset, ShardDataset):
        return [_Unit(number, tar=path) for number, path in enumerate(dataset.shards)]
    size = len(dataset)  # type: ignore[arg-type]
    return [
        _Unit(number, start, min(start + shard_size, size))
        for number, start in enumerate(range(0, size, shard_size))
    ]


class _UnitBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices over index-range units in order; no batch crosses two units."""

    def __init__(self, units: list[_Unit], batch_size: int) -> None:
        self.units, self.batch_size = units, batch_size

    def batches_of(self, unit: _Unit) -> int:
        return -(-(unit.stop - unit.start) // self.batch_size)

    def __len__(self) -> int:
        return sum(self.batches_of(unit) for unit in self.units)

    def __iter__(self) -> Iterator[list[int]]:
        for unit in self.units:
            for start in range(unit.start, unit.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, unit.stop)))


def _tar_batches(dataset: ShardDataset, unit: _Unit, batch_size: int) -> Iterator[dict]:
    """Batches of one tar read once, in file order, decoded with the dataset's own decoder (no flip)."""
    pending: list[dict] = []
    skipped: list[str] = []
    for position, raw in enumerate(dataset.read_raw(unit.tar)):
        decoded = dataset._decode(raw, 0)
        if isinstance(decoded, str):
            skipped.append(decoded)
            continue
        pending.append({**decoded, "index": position, "skipped": []})
        if len(pending) == batch_size:
            batch = collate_samples(pending)
            batch["skipped"], skipped, pending = skipped, [], []
            yield batch
    if pending or skipped:
        batch = collate_samples(pending) if pending else {"image": None}
        batch["skipped"] = skipped
        yield batch


class _TarUnits(IterableDataset):
    """``(unit number, batch)`` for the tars of ``units``, then ``(unit number, None)`` when a tar is done.

    DataLoader workers take whole tars (worker w: tars w, w + W, ...), so tars decode in parallel; their
    batches arrive interleaved and are told apart by the unit number."""

    def __init__(self, dataset: ShardDataset, units: list[_Unit], batch_size: int) -> None:
        self.dataset, self.units, self.batch_size = dataset, units, batch_size

    def __iter__(self) -> Iterator[tuple[int, dict | None]]:
        worker = get_worker_info()
        mine = self.units[worker.id :: worker.num_workers] if worker is not None else self.units
        for unit in mine:
            for batch in _tar_batches(self.dataset, unit, self.batch_size):
                yield unit.number, batch
            yield unit.number, None


def _rank_batches(
    dataset: Dataset, units: list[_Unit], batch_size: int, num_workers: int, pin_memory: bool
) -> Iterator[tuple[int, dict | None]]:
    """Every batch of ``units`` as ``(unit number, batch)``, each unit ending with ``(unit number, None)``.

    One DataLoader for all of a rank's units, so that workers start once and keep loading across shard
    boundaries while the model encodes (one loader per shard drained the pipeline at every shard). A
    unit's batches come in order; units of tars may interleave (one tar per worker). Bad files are
    listed in each batch's ``skipped``.
    """
    if not units:
        return
    if units[0].tar is not None:
        assert isinstance(dataset, ShardDataset)
        workers = min(num_workers, len(units))  # a worker without a tar would only cost a process
        yield from DataLoader(_TarUnits(dataset, units, batch_size), batch_size=None, num_workers=workers,
                              pin_memory=pin_memory)
        return
    sampler = _UnitBatchSampler(units, batch_size)
    loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_samples,
                             pin_memory=pin_memory))
    for unit in units:
        for _ in range(sampler.batches_of(unit)):
            yield unit.number, next(loader)
        yield unit.number, None


# ---------------------------------------------------------------------------------------------
# Writing the cache
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CacheResult:
    """What :func:`cache_latents` did."""

    directory: Path  #: the cache directory
    metadata: dict[str, Any]  #: the contents of cache.json
    written_shards: list[int]  #: shards this process encoded in this call (the rest existed or were another rank's)


class _UnitEncoder:
    """Encodes one unit's batches (plain and flipped) as they arrive; :meth:`finish` gives its shard."""

    def __init__(self, tokenizer: Any, unit: _Unit, latent_shape: tuple[int, int, int]) -> None:
        self.tokenizer, self.unit, self.latent_shape = tokenizer, unit, latent_shape
        self.device = next(tokenizer.parameters()).device
        self.latents: list[torch.Tensor] = []
        self.flipped: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        self.skipped: list[str] = []
        self.captions: list[str] = []
        self.seen = 0  # samples of this unit read so far

    def add(self, batch: dict, progress: Any) -> None:
        self.skipped.extend(batch["skipped"])
        if batch["image"] is None:
            return
        index = batch["index"].long()
        if self.unit.tar is None:
            # A bad image is replaced by the next good one, which is cached at its own index anyway:
            # the replacement is dropped here (no duplicates) and the bad file only counted.
            keep = index == torch.arange(self.unit.start + self.seen, self.unit.start + self.seen + len(index))
        else:
            keep = torch.ones(len(index), dtype=torch.bool)
        self.seen += len(index)
        progress.update(len(index))
        if not keep.any():
            return
        images = batch["image"][keep].to(self.device, non_blocking=True)  # pinned by the loader on CUDA
        with torch.inference_mode():
            self.latents.append(self.tokenizer.encode(images).float().cpu())
            self.flipped.append(self.tokenizer.encode(images.flip(-1)).float().cpu())
        self.labels.append(batch["label"][keep].long())
        self.indices.append(index[keep])
        self.captions += [c for c, k in zip(batch.get("caption", [""] * len(index)), keep.tolist()) if k]

    def finish(self) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
        """The tensors of the unit's shard, the files skipped in it and the captions of its samples."""
        empty = torch.zeros((0, *self.latent_shape))
        z = torch.cat(self.latents) if self.latents else empty
        z_flip = torch.cat(self.flipped) if self.flipped else empty
        moments = ChannelMoments.of(z).merge(ChannelMoments.of(z_flip))
        tensors = {
            "latents": z.contiguous(),
            "latents_flip": z_flip.contiguous(),
            "labels": torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long),
            "indices": torch.cat(self.indices) if self.indices else torch.zeros(0, dtype=torch.long),
            "stat_count": torch.tensor([moments.count], dtype=torch.int64),
            "stat_mean": moments.mean,
            "stat_m2": moments.m2,
        }
        # A run of bad files is listed by every draw that passed over it: keep each file once.
        return tensors, list(dict.fromkeys(self.skipped)), self.captions


def _resolved_spec(data: str) -> str:
    """Local folders and tars as absolute paths, so that a re-run from another directory matches."""
    return str(Path(data).resolve()) if os.path.exists(data) else data


def _prepare_directory(out: Path, plan: dict[str, Any]) -> None:
    """Create the cache directory or check that its shards were made with the same settings."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tmp*"):  # a shard write interrupted by a kill
        stale.unlink(missing_ok=True)
    plan_path = out / PLAN_FILE
    if plan_path.is_file():
        existing = json.loads(plan_path.read_text())
        changed = sorted(k for k in set(plan) | set(existing) if plan.get(k) != existing.get(k))
        if changed:
            listing = ", ".join(f"{k}: {existing.get(k)!r} -> {plan.get(k)!r}" for k in changed)
            raise ValueError(
                f"{out} holds a latent cache made with other settings ({listing}); "
                "use another --out or delete it"
            )
    else:
        write_text_atomically(plan_path, json.dumps(plan, indent=2) + "\n")


def _collective(dist: Any, action: Any) -> Any:
    """Run ``action()`` on rank 0 and hand its result to every rank; a user error is raised on all."""
    from aligntok.training import distributed

    result, problem = None, None
    if dist.is_main:
        try:
            result = action()
        except (ValueError, OSError) as e:
            problem = f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e)
    result, problem = distributed.broadcast_object((result, problem))
    if problem is not None:
        raise ValueError(problem)
    return result


def cache_latents(
    tokenizer_dir: str | os.PathLike,
    data: str,
    out_dir: str | os.PathLike,
    *,
    resolution: int = 256,
    batch_size: int = 64,
    shard_size: int = 10000,
    num_workers: int = 2,
    builtin_size: int = 10000,
    progress: bool = True,
    captions: bool = False,
) -> CacheResult:
    """Encode every image of ``data`` (plain and flipped) into a sharded cache in ``out_dir``.

    Resumable (finished shards are kept), distributed under torchrun (ranks take disjoint shards), and
    the per-channel latent mean and std end up in ``cache.json`` and in the tokenizer's own config.
    ``tokenizer_dir`` is a local aligntok tokenizer directory, which is updated with the statistics, or
    any other tokenizer source (a hub id, a diffusers AutoencoderKL): its aligntok copy is saved as
    ``out_dir/tokenizer`` and gets the statistics (use that copy to sample from a DiT trained on the cache).
    ``captions`` keeps each sample's caption and the flipped image's caption (built-in captions swap
    left/right) in its shard's metadata, and the image size (its bucket) in cache.json, for text-to-image.
    """
    from aligntok import __version__
    from aligntok.eval.provenance import sha256_file
    from aligntok.models.tokenizer import WEIGHTS_NAME, AlignTokTokenizer
    from aligntok.progress import progress_bar
    from aligntok.training import distributed

    if batch_size < 1 or shard_size < 1 or num_workers < 0:
        raise ValueError(f"need batch_size >= 1, shard_size >= 1, num_workers >= 0 (got {batch_size}, {shard_size}, {num_workers})")
    out = Path(out_dir)
    dist = distributed.init_distributed()
    source = str(tokenizer_dir)
    tokenizer_dir, copied = _collective(dist, lambda: _writable_tokenizer(source, out))
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = AlignTokTokenizer.from_pretrained(tokenizer_dir, map_location=dist.device).eval()
    if resolution <= 0 or resolution % tokenizer.stride:
        raise ValueError(f"--resolution {resolution} is not a positive multiple of the tokenizer's stride {tokenizer.stride}")
    side = resolution // tokenizer.stride
    latent_shape = (tokenizer.latent_channels, side, side)
    dataset = build_dataset(data, resolution, hflip=False, seed=0, builtin_size=builtin_size)
    units = _plan_units(dataset, shard_size)
    if not units:
        raise ValueError(f"data {data!r} holds no images")
    plan = {
        "format": FORMAT_NAME,
        "tokenizer_sha256": None,  # filled on rank 0 (one read of the weights)
        **({"tokenizer_source": source} if copied else {}),
        "data": _resolved_spec(data),
        "resolution": resolution,
        "builtin_size": builtin_size if data.startswith("builtin:") else None,
        "shard_size": shard_size if not isinstance(dataset, ShardDataset) else None,
        "num_shards": len(units),
        "latent_shape": list(latent_shape),
    }
    if captions:  # only when asked: caches made before captions existed keep their plan
        plan.update(captions=True, image_size=[resolution, resolution])
    flip_caption = getattr(dataset, "flip_caption", lambda caption: caption)

    def prepare() -> tuple[dict[str, Any], list[int]]:
        plan["tokenizer_sha256"] = sha256_file(tokenizer_dir / WEIGHTS_NAME)
        _prepare_directory(out, plan)
        return plan, [u.number for u in units if not (out / u.file_name).is_file()]

    plan, missing = _collective(dist, prepare)
    mine = [units[n] for n in missing[dist.rank :: dist.world_size]]
    if dist.is_main:
        log.info("latent cache %s: %d of %d shards to encode on %d rank(s)", out, len(missing), len(units), dist.world_size)
    total = sum(_unit_size(dataset, u) for u in mine)
    written: list[int] = []
    by_number = {unit.number: unit for unit in mine}
    open_units: dict[int, _UnitEncoder] = {}  # more than one only while workers read several tars
    batches = _rank_batches(dataset, mine, batch_size, num_workers, pin_memory=dist.device.type == "cuda")
    with progress_bar(total=total, unit="img", desc="cache-latents", disable=not (progress and dist.is_main)) as bar:
        for number, batch in batches:
            if number not in open_units:
                open_units[number] = _UnitEncoder(tokenizer, by_number[number], latent_shape)
            if batch is not None:
                open_units[number].add(batch, bar)
                continue
            tensors, skipped, texts = open_units.pop(number).finish()
            # Atomic: a kill or a full disk leaves no shard rather than half of one, and a re-run encodes it.
            extra = {"captions": json.dumps([[c, flip_caption(c)] for c in texts])} if captions else {}
            save_safetensors(tensors, out / by_number[number].file_name,
                             metadata={"format": FORMAT_NAME, "skipped": json.dumps(skipped), **extra})
            written.append(number)
    dist.barrier()

    def finish() -> dict[str, Any]:
        metadata = _summarise(out, units, plan)
        metadata.update(
            aligntok_version=__version__,
            tokenizer=str(tokenizer_dir.resolve()),
            num_classes=int(getattr(dataset, "num_classes", 0)),
            class_names=list(getattr(dataset, "class_names", [])),
        )
        write_text_atomically(out / CACHE_FILE, json.dumps(metadata, indent=2) + "\n")
        # Normalisation constants live in the tokenizer's config; reload on the CPU so that exactly the
        # saved weights are written back.
        updated = AlignTokTokenizer.from_pretrained(tokenizer_dir)
        recorded = (updated.config.latent_mean, updated.config.latent_std)
        # the config keeps them as float32 values (set_latent_stats): compare in that precision
        fresh = tuple(torch.tensor(metadata[k], dtype=torch.float32).tolist() for k in ("latent_mean", "latent_std"))
        if recorded[0] is not None and recorded != fresh:
            log.warning(
                "replacing the latent statistics recorded in %s; DiTs trained on the old ones keep theirs in "
                "their model directory and are still sampled with them", tokenizer_dir,
            )
        updated.set_latent_stats(metadata["latent_mean"], metadata["latent_std"])
        updated.save_pretrained(
            tokenizer_dir,
            card_extra={"latent statistics": f"{metadata['num_images']} images of {metadata['data']} at {resolution} px"},
        )
        return metadata

    metadata = _collective(dist, finish)
    if dist.is_main:
        log.info(
            "latent cache %s: %d images, %d skipped; statistics written to %s",
            out, metadata["num_images"], metadata["skipped_images"], tokenizer_dir,
        )
    return CacheResult(out, metadata, sorted(written))


def _writable_tokenizer(source: str, out: Path) -> tuple[str, bool]:
    """The local aligntok tokenizer directory that records the statistics, and whether it is a copy.

    A local aligntok directory is used as is. Anything else ``from_pretrained`` loads (a hub id, a diffusers
    AutoencoderKL directory) is not ours to write: its aligntok copy ``out/tokenizer`` is made once and
    reused by re-runs (plan.json's ``tokenizer_source`` keeps a re-run from pairing it with another source).
    """
    from aligntok.models.tokenizer import (
        CONFIG_NAME,
        WEIGHTS_NAME,
        LatentTokenizer,
        diffusers_class_name,
    )

    path = Path(source).expanduser()
    if (path / WEIGHTS_NAME).is_file() and diffusers_class_name(path) is None and (path / CONFIG_NAME).is_file():
        return str(path), False
    copy = out / TOKENIZER_COPY
    if not (copy / WEIGHTS_NAME).is_file():
        LatentTokenizer.from_pretrained(source).save_pretrained(copy, card_extra={"copied from": source})
    return str(copy), True


def _unit_size(dataset: Dataset, unit: _Unit) -> int:
    if unit.tar is not None:
        assert isinstance(dataset, ShardDataset)
        return dataset.shard_size(unit.tar)
    return unit.stop - unit.start


def _summarise(out: Path, units: list[_Unit], plan: dict[str, Any]) -> dict[str, Any]:
    """cache.json's contents from the shards on disk: counts, labels, statistics, skipped files."""
    moments = ChannelMoments.empty(plan["latent_shape"][0])
    shards: list[dict[str, Any]] = []
    skipped_files: dict[str, None] = {}  # ordered set: a run of bad files may straddle two shards
    low, high = None, None
    for unit in units:
        path = out / unit.file_name
        if not path.is_file():
            raise ValueError(f"shard {path} is missing after encoding; re-run cache-latents to complete the cache")
        with safe_open(str(path), framework="pt") as shard:
            part = ChannelMoments(
                int(shard.get_tensor("stat_count")[0]), shard.get_tensor("stat_mean"), shard.get_tensor("stat_m2")
            )
            labels = shard.get_tensor("labels")
            skipped = json.loads((shard.metadata() or {}).get("skipped", "[]"))
        moments = moments.merge(part)
        shards.append({"file": unit.file_name, "images": len(labels)})
        skipped_files.update(dict.fromkeys(skipped))
        if len(labels):
            low = int(labels.min()) if low is None else min(low, int(labels.min()))
            high = int(labels.max()) if high is None else max(high, int(labels.max()))
    num_images = sum(s["images"] for s in shards)
    if num_images == 0:
        raise ValueError(f"no readable image in {plan['data']} ({len(skipped_files)} skipped): the cache would be empty")
    std = moments.std
    if not bool(torch.isfinite(std).all() and (std > 0).all()):
        raise ValueError(f"latent std is not finite and positive in every channel ({std.tolist()}): the tokenizer's latents are degenerate")
    return {
        **plan,
        "num_images": num_images,
        "label_range": [low, high],
        "shards": shards,
        "latent_mean": moments.mean.tolist(),
        "latent_std": std.tolist(),
        "statistics": "per channel over every position of the plain and flipped latents, float64; std unbiased",
        "skipped_images": len(skipped_files),
        "skipped_files": list(skipped_files)[:MAX_LISTED_SKIPS],
    }
