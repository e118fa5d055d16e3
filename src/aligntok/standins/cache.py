"""Where stand-ins live: shipped with the package, else the on-disk cache of trained recipes.

**Shipped.** The recipes the demo uses come pretrained as package data (``aligntok/standins/shipped/``,
a few MB of safetensors + json, built by ``python -m aligntok.standins.build`` from fixed seeds): the
offline analogue of downloading DINOv2 and Inception weights. A recipe whose directory is shipped is
never trained; tests pin the shipped files' hashes.

**Cache.** Any other recipe is trained on first use and cached:
``$ALIGNTOK_CACHE``, else ``$XDG_CACHE_HOME/aligntok``, else ``~/.cache/aligntok``; one directory per
recipe under ``standins/``, named by the kind and a hash of the recipe's settings and
:data:`RECIPE_VERSION`. A recipe is trained in a temporary directory and renamed into place
(:func:`aligntok.io.write_directory_atomically`) while holding a file lock, so concurrent first runs
(two ranks, two processes) train once and every reader sees a complete directory. Training runs in the
calling process only, never as a collective: under torchrun every rank may call ``ensure_*``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from aligntok.config import config_to_dict
from aligntok.io import write_directory_atomically

CACHE_ENV = "ALIGNTOK_CACHE"
#: Bump when the training code changes what a given set of settings produces (invalidates caches).
RECIPE_VERSION = 1
#: Written last into every cached directory: recipe, settings and training record.
INFO_FILE = "standin.json"

#: Trainings run by this process, per kind (lets tests check that a cached recipe is not retrained).
TRAINING_RUNS: dict[str, int] = {"encoder": 0, "eval": 0, "text": 0}
DESCRIPTIONS = {"encoder": "stand-in DINOv2 foundation encoder", "eval": "built-in evaluation network (CNN)",
                "text": "stand-in T5 text encoder (built-in captions)"}


def cache_root() -> Path:
    """``$ALIGNTOK_CACHE``, else ``$XDG_CACHE_HOME/aligntok``, else ``~/.cache/aligntok``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "aligntok"


def select_preset(presets: Mapping[str, Any], what: str, settings: Any, default: str) -> Any:
    """``settings`` itself, or the preset it names (``None``: ``default``)."""
    if settings is None or isinstance(settings, str):
        name = default if settings is None else settings
        if name not in presets:
            raise ValueError(f"unknown {what} {name!r}; available: {', '.join(presets)}")
        return presets[name]
    return settings


def recipe_key(kind: str, settings: Any) -> str:
    """16 hex digits naming a recipe: its kind, :data:`RECIPE_VERSION` and every setting."""
    document = {"kind": kind, "recipe_version": RECIPE_VERSION, "settings": config_to_dict(settings)}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def is_complete(directory: Path) -> bool:
    # The directory appears by an atomic rename with INFO_FILE inside; checking the file as well
    # rejects a directory someone created or emptied by hand.
    return (directory / INFO_FILE).is_file()


def training_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


#: Package data: directories named like the cache's (``KIND-KEY``), found before the cache is looked at.
SHIPPED_DIR = Path(__file__).parent / "shipped"


def shipped_directory(kind: str, settings: Any) -> Path | None:
    """The shipped directory of ``kind`` for ``settings``, or None when this recipe is not shipped."""
    target = SHIPPED_DIR / f"{kind}-{recipe_key(kind, settings)}"
    return target if is_complete(target) else None


def ensure_cached(kind: str, settings: Any, build: Callable[[Path], dict[str, Any]], *, progress: bool,
                  root: Path | None = None) -> Path:
    """The directory of ``kind`` for ``settings``: shipped, cached, or built with ``build(tmp_dir)`` into the cache.

    ``build`` writes the files into the staging directory and returns the training record, which
    lands in :data:`INFO_FILE` with the recipe. ``root`` (default: ``cache_root()/standins``, after the
    shipped directories) builds under that folder instead, skipping the shipped lookup (how the
    shipped files are built). Errors: ValueError when the folder cannot be created.
    """
    from filelock import FileLock

    settings.validate()
    key = recipe_key(kind, settings)
    if root is None:
        shipped = shipped_directory(kind, settings)
        if shipped is not None:
            return shipped
        root = cache_root() / "standins"
    target = root / f"{kind}-{key}"
    if is_complete(target):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the cache directory {root} ({e.strerror}); set ${CACHE_ENV}") from None
    with FileLock(str(root / f".{target.name}.lock")):
        if is_complete(target):  # another process finished it while this one waited
            return target
        if progress:
            print(f"aligntok: training the {DESCRIPTIONS[kind]} on built-in data, {settings.steps} steps "
                  f"(first run only; cached in {target})", file=sys.stderr, flush=True)

        def write(staging: Path) -> None:
            record = build(staging)
            info = {"kind": kind, "description": DESCRIPTIONS[kind], "recipe_version": RECIPE_VERSION,
                    "key": key, "settings": config_to_dict(settings), **record,
                    "device": str(training_device()), "torch": torch.__version__}
            (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

        write_directory_atomically(target, write)
        TRAINING_RUNS[kind] += 1
    return target


def read_standin_info(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe, settings and training record (time, losses, held-out accuracy) of a stand-in directory."""
    file = Path(path) / INFO_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a stand-in directory (no {INFO_FILE})")
    return json.loads(file.read_text())
