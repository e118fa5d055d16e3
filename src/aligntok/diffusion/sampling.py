"""Sampling images from a trained LightningDiT: what ``aligntok sample`` runs.

Sample ``i`` gets label ``i % num_classes`` (class-balanced) unless labels are given, and its own
noise generator seeded from ``(seed, i)`` (a CPU generator, so the noise does not depend on the
device). The samples are cut into global batches of ``batch_size`` consecutive indices and batch ``k``
runs on rank ``k % world_size``: every batch has the same contents and shape whether one process makes
all of them or several share them, so the N samples come out bitwise identical (given the same device
kind and, on the CPU, the same number of threads per process).

The latents are de-normalised with the per-channel statistics the DiT was trained with (recorded in its
directory by ``train-dit``; the tokenizer's for a DiT that records none), decoded, and written as
``grid.png`` (the first ``grid_max`` samples), ``samples.npz`` (ADM format: uint8 NHWC ``arr_0``,
labels ``arr_1``) and ``sampling.json`` (every setting). Ranks hand their batches to rank 0 through
files under ``OUT/.parts`` (so multi-node runs need a shared file system), removed at the end. A run
that is interrupted (killed, out of disk) keeps its finished batches there: the same command again
makes only the missing ones, and its samples equal an uninterrupted run's. Every file is written
atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aligntok.config import config_from_dict
from aligntok.diffusion.samplers import SamplerConfig, sample
from aligntok.io import replace_atomically, write_text_atomically

if TYPE_CHECKING:
    from aligntok.models.lightningdit import LightningDiT
    from aligntok.models.tokenizer import LatentTokenizer

GRID_FILE = "grid.png"
SAMPLES_FILE = "samples.npz"
SETTINGS_FILE = "sampling.json"
PARTS_DIR = ".parts"
PARTS_PLAN = "plan.json"  #: in PARTS_DIR: what its batches were made with
_SEED_MASK = (1 << 64) - 1

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SampleConfig:
    """How many samples, of which classes, from which seed, in which batches."""

    num: int = 64  #: number of samples
    seed: int = 0  #: sample i's noise comes from a generator seeded from (seed, i)
    labels: list[int] | None = None  #: sample i gets labels[i % len(labels)]; None = i % num_classes (balanced)
    batch_size: int = 32  #: samples per model call (the same batches whatever the number of processes)
    grid_max: int = 64  #: the first this-many samples go into grid.png
    sampler: SamplerConfig | None = None  #: method, steps, guidance; None = the DiT's recorded settings (see recorded_sampler)

    def validate(self) -> None:
        if self.num < 1 or self.batch_size < 1 or self.grid_max < 1:
            raise ValueError(f"num, batch_size and grid_max must be >= 1 (got {self.num}, {self.batch_size}, {self.grid_max})")
        if self.labels is not None and not self.labels:
            raise ValueError("labels, when given, must hold at least one class")
        if self.sampler is not None:
            self.sampler.validate()


def recorded_sampler(dit: str | os.PathLike, **overrides: Any) -> SamplerConfig:
    """The sampler settings ``train-dit`` recorded in DiT directory ``dit`` (SamplerConfig's defaults where
    none are recorded, e.g. for an imported checkpoint), with ``overrides`` (SamplerConfig fields) on top."""
    from aligntok.models.lightningdit import read_pretrained_document

    recorded = read_pretrained_document(dit).get("sampler") or {}
    return config_from_dict(SamplerConfig, {**recorded, **overrides})


def latent_statistics(
    model: LightningDiT, tokenizer: LatentTokenizer, tokenizer_name: str = "the tokenizer"
) -> tuple[list[float], list[float], str]:
    """(mean, std, source) to de-normalise ``model``'s samples with: the statistics the DiT was trained with
    (source "dit"), or the tokenizer's for a DiT that records none (source "tokenizer").

    A tokenizer whose statistics differ from the DiT's (``cache-latents`` was run again on it) is only
    logged: its decoder still fits, and the DiT's statistics are the ones its samples are in.
    Raises ValueError when neither holds statistics.
    """
    tokenizer_mean, tokenizer_std = tokenizer.config.latent_mean, tokenizer.config.latent_std
    stats = model.latent_stats
    if stats is None:
        if tokenizer_mean is None or tokenizer_std is None:
            raise ValueError(
                f"{tokenizer_name} has no latent statistics to de-normalise with and the DiT records none "
                "(run aligntok cache-latents)"
            )
        return list(tokenizer_mean), list(tokenizer_std), "tokenizer"
    if tokenizer_mean is not None and tokenizer_std is not None:
        shift = max(abs(a - b) for a, b in zip(stats["mean"], tokenizer_mean, strict=True))
        ratio = max(max(a / b, b / a) for a, b in zip(stats["std"], tokenizer_std, strict=True))
        if shift > 1e-6 or ratio > 1 + 1e-6:
            log.warning(
                "the tokenizer's latent statistics differ from those the DiT was trained with (max |mean "
                "difference| %.4g, max std ratio %.4g; cache-latents was run again?): de-normalising with the DiT's",
                shift, ratio,
            )
    return list(stats["mean"]), list(stats["std"]), "dit"


@dataclasses.dataclass
class SampleResult:
    """Where the samples went (on rank 0; the other ranks get the same paths)."""

    directory: Path
    samples: Path  #: samples.npz
    grid: Path  #: grid.png
    settings: dict[str, Any]  #: the contents of sampling.json


def sample_labels(num: int, num_classes: int, labels: Sequence[int] | None = None) -> torch.Tensor:
    """The label of every sample: ``labels`` repeated, or ``i % num_classes``; checked against the model."""
    if labels is None:
        return torch.arange(num, dtype=torch.long) % num_classes
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise ValueError(f"labels {bad} are outside the model's classes 0..{num_classes - 1}")
    given = torch.tensor(list(labels), dtype=torch.long)
    return given[torch.arange(num) % len(given)]


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample ``index``: a pure function of (seed, index)."""
    state = np.random.SeedSequence([seed & _SEED_MASK, index & _SEED_MASK]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _image_grid(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC images tiled row by row into one uint8 HWC image, 2 px black gaps."""
    from torchvision.utils import make_grid

    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
    grid = make_grid(tensor, nrow=math.ceil(math.sqrt(len(images))), padding=2, pad_value=0)
    return grid.permute(1, 2, 0).contiguous().numpy()


def decode_samples(
    model: LightningDiT, tokenizer: LatentTokenizer, labels: torch.Tensor, indices: Sequence[int],
    sampler: SamplerConfig, seed: int, stats: tuple[list[float], list[float]],
) -> np.ndarray:
    """Samples ``indices`` (of class ``labels``, noise from :func:`sample_generator`) de-normalised with the
    per-channel ``stats`` (mean, std; see :func:`latent_statistics`) and decoded to uint8 NHWC."""
    from aligntok.eval.images import to_uint8_nhwc

    mean, std = stats
    device = next(model.parameters()).device
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    latents = sample(
        model, labels, sampler, generator=[sample_generator(seed, i) for i in indices],
        denormalize=lambda z: z * std_t + mean_t,
    )
    with torch.inference_mode():
        return to_uint8_nhwc(tokenizer.decode(latents))


def generate_images(
    model: LightningDiT, tokenizer: LatentTokenizer, labels: torch.Tensor, sampler: SamplerConfig, *,
    seed: int = 0, batch_size: int = 64,
) -> np.ndarray:
    """In this process, sample one image per label and decode it: uint8 (N, H, W, 3).

    The same samples as :func:`sample_to_directory` with this seed, labels and batch size.
    """
    stats = latent_statistics(model, tokenizer)[:2]
    batches = []
    for start in range(0, len(labels), batch_size):
        indices = range(start, min(start + batch_size, len(labels)))
        batches.append(decode_samples(model, tokenizer, labels[indices.start : indices.stop], indices, sampler, seed, stats))
    return np.concatenate(batches)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as file:  # a file object: np.save would append .npy to the staging name
        np.save(file, array)


def run_identity(models: dict[str, str | os.PathLike], settings: Any, device: Any) -> dict[str, Any]:
    """What the batches of a run depend on: ``settings`` (JSON-able, or a dataclass), the device kind, and the
    files of each model directory in ``models`` (by size and modification time, so a retrained model or
    re-cached statistics make earlier batches stale)."""

    def files(source: str | os.PathLike) -> Any:
        folder = Path(source)
        if not folder.is_dir():
            return str(source)  # a hub id: its revision is fixed by the cache
        return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file()}

    settings = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings
    return {
        **{name: [str(Path(source).resolve()), files(source)] for name, source in models.items()},
        "settings": settings,
        "device": torch.device(device).type,
    }


def _prepare_parts(parts: Path, identity: dict[str, Any]) -> None:
    """Keep the finished batches of an interrupted run with the same ``identity``; start afresh otherwise."""
    plan = parts / PARTS_PLAN
    try:
        same = json.loads(plan.read_text()) == json.loads(json.dumps(identity))
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True)
        write_text_atomically(plan, json.dumps(identity, indent=2) + "\n")


def run_batches(
    parts: Path, identity: dict[str, Any], num_batches: int, make_batch: Callable[[int], np.ndarray], dist: Any
) -> np.ndarray | None:
    """Batch ``b`` of ``num_batches`` made as ``make_batch(b)`` (uint8 NHWC) on rank ``b % world_size``.

    Each finished batch is kept under ``parts`` (written atomically), so a run interrupted by a kill or a full
    disk resumes with only the missing batches when ``identity`` (:func:`run_identity`) is unchanged. Every
    rank calls this; rank 0 gets every batch concatenated in order, the others None. The caller removes
    ``parts`` once its outputs are written.
    """
    if dist.is_main:
        _prepare_parts(parts, identity)
    dist.barrier()
    for batch in range(dist.rank, num_batches, dist.world_size):
        part = parts / f"batch-{batch:06d}.npy"
        if part.is_file():  # made by an interrupted run of the same settings
            continue
        images = make_batch(batch)
        replace_atomically(part, lambda staging, images=images: _save_npy(staging, images))
    dist.barrier()
    if not dist.is_main:
        return None
    return np.concatenate([np.load(parts / f"batch-{b:06d}.npy") for b in range(num_batches)])


def sample_to_directory(
    dit: str | os.PathLike,
    tokenizer: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: SampleConfig | None = None,
    *,
    compile_dit: bool = False,
) -> SampleResult:
    """Sample ``config.num`` images from the DiT in ``dit`` and decode them with ``tokenizer`` into ``out_dir``.

    Runs as one process or under torchrun (every rank calls it); see the module doc for the outputs.
    ``tokenizer`` is any tokenizer source (directory, hub id, diffusers AutoencoderKL). ``compile_dit``:
    ``torch.compile`` the DiT's blocks (:meth:`LightningDiT.compile_repeated_blocks`; the same samples up
    to float rounding, so a resumed run may mix the two). Raises a one-line ValueError when the DiT and
    tokenizer do not fit together, the tokenizer has no latent statistics, or ``compile_dit`` lacks a C++
    compiler on the CPU.
    """
    from PIL import Image

    from aligntok import __version__
    from aligntok.eval.images import save_npz
    from aligntok.models.lightningdit import LightningDiT
    from aligntok.models.tokenizer import AlignTokTokenizer
    from aligntok.training import distributed

    config = config or SampleConfig()
    config.validate()
    dist = distributed.init_distributed()
    if compile_dit and not LightningDiT.can_compile(dist.device):
        raise ValueError("--compile on the CPU needs a C++ compiler (c++, g++ or clang++; or set CXX)")
    model = LightningDiT.from_pretrained(dit, device=dist.device).eval()
    if compile_dit:
        model.compile_repeated_blocks()
    tok = AlignTokTokenizer.from_pretrained(tokenizer, map_location=dist.device).eval()
    if model.config.in_channels != tok.latent_channels:
        raise ValueError(
            f"the DiT makes {model.config.in_channels}-channel latents but tokenizer {tokenizer} has "
            f"{tok.latent_channels} channels: they were not trained together"
        )
    latent_mean, latent_std, stats_source = latent_statistics(model, tok, f"tokenizer {tokenizer}")
    sampler = config.sampler if config.sampler is not None else recorded_sampler(dit)
    labels = sample_labels(config.num, model.num_classes, config.labels)
    out = Path(out_dir)
    parts = out / PARTS_DIR
    started = time.perf_counter()
    num_batches = math.ceil(config.num / config.batch_size)

    def make_batch(batch: int) -> np.ndarray:
        indices = range(batch * config.batch_size, min((batch + 1) * config.batch_size, config.num))
        return decode_samples(
            model, tok, labels[indices.start : indices.stop], indices, sampler, config.seed, (latent_mean, latent_std)
        )

    images = run_batches(parts, run_identity({"dit": dit, "tokenizer": tokenizer}, config, dist.device), num_batches,
                         make_batch, dist)

    settings = {
        "dit": str(dit),
        "tokenizer": str(tokenizer),
        "num": config.num,
        "seed": config.seed,
        "seeding": "sample i: torch.Generator (CPU) seeded from numpy SeedSequence([seed, i])",
        "labels": "balanced: i % num_classes" if config.labels is None else f"given, repeated: {list(config.labels)}",
        "num_classes": model.num_classes,
        "batch_size": config.batch_size,
        "sampler": dataclasses.asdict(sampler),
        "latent_shape": [model.config.in_channels, model.config.input_size, model.config.input_size],
        "latent_mean": latent_mean,
        "latent_std": latent_std,
        "latent_stats_from": stats_source,  # dit: recorded at training; tokenizer: the DiT records none
        "world_size": dist.world_size,
        "device": str(dist.device),
        "seconds": None,  # filled below
        "aligntok_version": __version__,
    }
    result = SampleResult(out, out / SAMPLES_FILE, out / GRID_FILE, settings)
    if images is not None:  # rank 0
        settings["image_size"] = list(images.shape[1:3])
        settings["seconds"] = round(time.perf_counter() - started, 3)
        save_npz(images, result.samples, labels.numpy())  # atomic, like every file below
        grid = Image.fromarray(_image_grid(images[: config.grid_max]))
        replace_atomically(result.grid, lambda staging: grid.save(staging, format="PNG"))
        write_text_atomically(out / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
        shutil.rmtree(parts, ignore_errors=True)  # only now: a kill before this point loses no batch
    dist.barrier()
    return result
