"""Atomic, self-checking training checkpoints.

Layout under a run's ``out_dir``::

    checkpoints/
      step_00000100/
        model_{name}.safetensors      weights of every module the task checkpoints
        ema_{name}.safetensors        fp32 EMA weights (same keys as the model file)
        optimizer_{name}.pt           AdamW state, keyed by parameter name
        scheduler_{name}.pt           LambdaLR state
        rng_rank{r}.pt                torch CPU (+ CUDA), numpy and python RNG states of rank r
        trainer_state.json            step, non-finite counters, data position, EMA update counts
        config.yaml                   the run's resolved config
        MANIFEST.json                 written last: every file above with its byte size
      latest                          name of the newest checkpoint (advanced after the rename)

A checkpoint is written into ``.tmp_step_...``, every file is fsynced, the manifest is written last,
and the directory is renamed atomically; a write that fails (e.g. a full disk) removes its temporary
directory and raises, leaving every complete checkpoint as it was. Loading only ever considers directories whose manifest is
present and whose files match it, so a run killed mid-write resumes from the previous checkpoint.
Weights are safetensors; other state is ``torch.save``d plain tensors and numbers, read back with
``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from aligntok.io import save_safetensors
from aligntok.training import distributed

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
LATEST = "latest"
TEMP_PREFIX = ".tmp_"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


# ----------------------------------------------------------------------------------------------
# Durable file writes
# ----------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable; some platforms (Windows) cannot open directories, which is harmless.
    with contextlib.suppress(OSError):
        _fsync_path(path)


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a flat tensor dict as safetensors and fsync it.

    Tensors that share storage (tied weights) are cloned, since safetensors refuses aliased tensors.
    """
    seen: set[tuple[int, int]] = set()
    plain: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        plain[key] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    save_safetensors(plain, path)  # fsynced; a full disk is an OSError, not safetensors' own error


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path), device="cpu")


def save_state(state: Any, path: Path) -> None:
    """``torch.save`` of plain state (tensors, numbers, strings, lists, dicts) with an fsync."""
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_state(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as plain tensors and numbers (loadable with ``weights_only``)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy's and python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ----------------------------------------------------------------------------------------------
# Finding complete checkpoints
# ----------------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The checkpoint's manifest if the directory is complete (every listed file, right size), else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        for name, size in files.items():
            if (path / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def is_complete(path: Path) -> bool:
    return read_manifest(path) is not None


def complete_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories, oldest first. Partial and temporary ones are left out."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            if is_complete(child):
                found.append((int(match.group(1)), child))
            else:
                log.warning("ignoring incomplete checkpoint %s (no valid %s)", child, MANIFEST)
    return [path for _, path in sorted(found)]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None. (The ``latest`` file is a hint for people and tools;
    the directory scan is what counts, so a stale or torn pointer can never select a partial write.)"""
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def remove_stale_temp_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted writes. Call on one rank only, while no checkpoint is being written."""
    root = checkpoints_root(out_dir)
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(TEMP_PREFIX):
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
                removed.append(child)
    return removed


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CheckpointPayload:
    """Everything rank 0 writes. State dicts must be full (gathered) and on the CPU."""

    models: dict[str, dict[str, torch.Tensor]]
    emas: dict[str, dict[str, torch.Tensor]]
    optimizers: dict[str, dict[str, Any]]
    schedulers: dict[str, dict[str, Any]]
    trainer_state: dict[str, Any]
    config_yaml: str | None = None


def _write_payload(directory: Path, payload: CheckpointPayload) -> None:
    for name, state in payload.models.items():
        save_tensors(state, directory / f"model_{name}.safetensors")
    for name, state in payload.emas.items():
        save_tensors(state, directory / f"ema_{name}.safetensors")
    for name, state in payload.optimizers.items():
        save_state(state, directory / f"optimizer_{name}.pt")
    for name, state in payload.schedulers.items():
        save_state(state, directory / f"scheduler_{name}.pt")
    write_text(directory / TRAINER_STATE, json.dumps(payload.trainer_state, indent=2, sort_keys=True))
    if payload.config_yaml is not None:
        write_text(directory / CONFIG_FILE, payload.config_yaml)


def _point_latest(root: Path, name: str) -> None:
    temp = root / f"{TEMP_PREFIX}{LATEST}"
    write_text(temp, name + "\n")
    os.replace(temp, root / LATEST)
    _fsync_dir(root)


def _prune(out_dir: Path, keep_last: int) -> None:
    for old in complete_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    payload: CheckpointPayload | None,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    keep_last: int,
) -> Path:
    """Write the checkpoint for ``step``. Collective: every rank calls it; rank 0 passes ``payload``.

    Each rank saves its own RNG state; rank 0 writes the rest, the manifest last, renames the
    directory into place, advances ``latest`` and deletes all but the newest ``keep_last``.
    """
    root = checkpoints_root(out_dir)
    final = root / step_dir_name(step)
    temp = root / f"{TEMP_PREFIX}{final.name}"
    if rank == 0:
        if payload is None:
            raise ValueError("rank 0 must pass the checkpoint payload")
        root.mkdir(parents=True, exist_ok=True)
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir()
    distributed.barrier()  # the temp directory exists for every rank
    try:
        save_state(capture_rng_state(device), temp / f"rng_rank{rank}.pt")
        if rank == 0:
            _write_payload(temp, payload)
    except BaseException:
        # A full disk or a failing device: give the space back; the complete checkpoints stay as they are.
        if rank == 0:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    distributed.barrier()  # every rank's files are written and fsynced
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(temp.iterdir())}
        manifest = {"format": FORMAT_VERSION, "step": step, "world_size": world_size, "files": files}
        write_text(temp / MANIFEST, json.dumps(manifest, indent=2))
        _fsync_dir(temp)
        if final.exists():  # only when a step is re-saved; keep the old one until the new one is in place
            retired = root / f"{TEMP_PREFIX}old_{final.name}"
            os.replace(final, retired)
            os.replace(temp, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temp, final)
        _fsync_dir(root)
        _point_latest(root, final.name)
        _prune(Path(out_dir), keep_last)
    distributed.barrier()  # nobody moves on (or reads) before the checkpoint is in place
    return final


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_STATE).read_text())


def read_rng_state(path: Path, rank: int) -> dict[str, Any] | None:
    """Rank ``rank``'s RNG state, or None when the checkpoint was written by fewer ranks."""
    file = path / f"rng_rank{rank}.pt"
    return load_state(file) if file.is_file() else None


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path.parent} has no {path.name} ({what})")
    return path


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header (no tensor is loaded)."""
    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (a safe_open handle)


def state_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> (global) shape of every entry of ``module.state_dict()``."""
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def describe_state_mismatch(expected: Mapping[str, Sequence[int]], given: Mapping[str, Sequence[int]]) -> str | None:
    """One line naming the keys ``given`` lacks or adds against ``expected`` (both name -> shape) and the
    shapes that differ, or None when all match."""

    def listing(names: list[str]) -> str:
        shown = ", ".join(names[:6])
        return shown + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")

    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = [
        f"{k} {tuple(given[k])} != {tuple(expected[k])}"
        for k in sorted(set(expected) & set(given))
        if tuple(given[k]) != tuple(expected[k])
    ]
    parts = []
    if missing:
        parts.append(f"missing keys: {listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {listing(unexpected)}")
    if wrong_shape:
        parts.append(f"shape mismatches: {listing(wrong_shape)}")
    return "; ".join(parts) or None


def load_module_weights(
    out_dir: str | os.PathLike, name: str, module: nn.Module, *, ema: bool = False
) -> Path:
    """Load module ``name``'s weights (or its EMA) from the newest complete checkpoint of a run.

    Returns the checkpoint directory used; raises FileNotFoundError when there is none.
    """
    path = latest_checkpoint(out_dir)
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoints_root(out_dir)}")
    prefix = "ema" if ema else "model"
    file = require_file(path / f"{prefix}_{name}.safetensors", f"{'EMA ' if ema else ''}weights of '{name}'")
    problem = describe_state_mismatch(state_shapes(module), tensor_shapes(file))
    if problem:
        raise ValueError(f"{file} does not fit module '{name}' (was the model's shape changed?): {problem}")
    module.load_state_dict(load_tensors(file))
    return path
