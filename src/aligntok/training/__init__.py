"""Training: one engine (trainer, checkpoints, EMA, distributed, logging) for every model.

The names below are imported lazily so that ``import aligntok.training.stages`` and the CLI's
``--help`` do not pay for the engine's imports until it is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Trainer": "aligntok.training.trainer",
    "Task": "aligntok.training.task",
    "TrainingAborted": "aligntok.training.trainer",
    "FitResult": "aligntok.training.task",
    "DistInfo": "aligntok.training.distributed",
    "init_distributed": "aligntok.training.distributed",
    "load_module_weights": "aligntok.training.checkpoint",
    "latest_checkpoint": "aligntok.training.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aligntok.training' has no attribute {name!r}")
