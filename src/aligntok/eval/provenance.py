"""What an evaluation measured, recorded next to its numbers.

Every result dict of :mod:`aligntok.eval` carries a ``provenance`` entry built here: sample count,
reference, feature networks with the sha256 of their weights, settings, software versions and
the device, so that a number can be traced back to exactly what produced it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# Distribution names (as pip knows them) whose versions change the numbers.
_TRACKED_DISTRIBUTIONS = (
    "aligntok",
    "torch",
    "torch-fidelity",
    "numpy",
    "scipy",
    "transformers",
    "lpips",
    "pytorch-msssim",
    "pillow",
)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so that multi-GB files do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: Sequence[str | os.PathLike]) -> str:
    """One sha256 over several files (sorted by name; each file's name and bytes are hashed)."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def software_versions() -> dict[str, str | None]:
    """Versions of Python and of every package that changes the numbers (None when absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _TRACKED_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def describe_device(device: torch.device | str | None) -> str:
    """A human-readable device name, e.g. 'cuda:0 (NVIDIA H100 80GB HBM3)' or 'cpu'."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def build_provenance(
    *,
    num_samples: int | None,
    reference: Mapping[str, Any] | None,
    feature_networks: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """The ``provenance`` entry of a result dict (plain JSON types only)."""
    return {
        "num_samples": num_samples,
        "reference": dict(reference) if reference is not None else None,
        "feature_networks": [dict(net) for net in feature_networks],
        "settings": dict(settings),
        "software": software_versions(),
        "device": describe_device(device),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
