"""What a model hands the training engine (:class:`aligntok.training.trainer.Trainer`): a :class:`Task`, and
what the engine hands back (:class:`FitResult`); the checks a task's modules and optimizer groups must pass,
and :func:`split_batch` for gradient accumulation.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

from torch import Tensor, nn

from aligntok.config import ConfigError

LossOutput = Mapping[str, tuple[Tensor, Mapping[str, "Tensor | float"]]]
LoaderFactory = Callable[[int], Iterator[dict]]

SKIPPED_KEY = "skipped"  #: batch key where the data layer lists input files it had to skip
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")  # module / optimizer names become file names


class Task(Protocol):
    """What a model contributes to training; the engine owns everything else.

    Optionally a task may define ``train_mode()``, which the engine calls before training instead of
    ``module.train()`` on every module (so that frozen parts can stay in eval mode). Under FSDP, call
    modules through ``forward`` (FSDP2 gathers a module's parameters in its forward hooks).
    """

    def modules(self) -> dict[str, nn.Module]:
        """Every module whose state is checkpointed (frozen teachers and LPIPS nets are not listed)."""
        ...

    def optimizers(self) -> dict[str, list[nn.Parameter]]:
        """One AdamW per entry, e.g. ``{"generator": [...], "discriminator": [...]}``; trainable only."""
        ...

    def ema_modules(self) -> list[str]:
        """Names in :meth:`modules` that keep an EMA when ``train.ema_decay > 0``."""
        ...

    def losses(self, batch: dict, step: int) -> LossOutput:
        """Per optimizer name: (scalar loss, logged parts). An absent name does not step this time.

        Called once per micro-batch. Which names are present must depend only on ``step``.
        """
        ...


@dataclasses.dataclass
class FitResult:
    """How :meth:`Trainer.fit` ended."""

    step: int  #: completed optimizer steps
    resumed_from: int | None  #: step of the checkpoint this call resumed from, None for a fresh start
    nonfinite_steps: int  #: steps skipped for a non-finite loss or gradient, over the whole run
    skipped_images: int  #: input files the data layer reported as skipped, over the whole run
    checkpoint: Path | None  #: the newest complete checkpoint


def split_batch(batch: dict, parts: int, expected_size: int | None = None) -> list[dict]:
    """Cut every tensor / list in ``batch`` into ``parts`` equal slices along dim 0.

    Other values (strings, numbers, 0-d tensors) are passed to every slice unchanged.
    """
    sizes: dict[str, int] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() > 0:
            sizes[key] = value.shape[0]
        elif isinstance(value, (list, tuple)):
            sizes[key] = len(value)
    if not sizes:
        raise ValueError(f"batch has no tensor or list to split (keys: {sorted(batch)})")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch entries disagree on the batch size: {sizes}")
    size = next(iter(sizes.values()))
    if expected_size is not None and size != expected_size:
        raise ValueError(
            f"batch holds {size} samples but {expected_size} were expected (train.batch_size / world size)"
        )
    if size % parts:
        raise ValueError(f"batch of {size} samples cannot be split into {parts} equal micro-batches")
    chunk = size // parts
    return [
        {key: value[i * chunk : (i + 1) * chunk] if key in sizes else value for key, value in batch.items()}
        for i in range(parts)
    ]


def checked_modules(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``task.modules()``, or a one-line ValueError: not a non-empty dict of modules, or a name unfit for a file."""
    if not isinstance(modules, dict) or not modules:
        raise ValueError("task.modules() must return a non-empty dict of name -> nn.Module")
    for name, module in modules.items():
        if not isinstance(module, nn.Module):
            raise ValueError(f"task.modules()['{name}'] is a {type(module).__name__}, not an nn.Module")
        if not NAME_PATTERN.match(name):
            raise ValueError(f"module name {name!r} must use only letters, digits, '_', '-' and '.'")
    return dict(modules)


def checked_param_groups(
    groups: dict[str, list[nn.Parameter]], configured: set[str], modules: dict[str, nn.Module]
) -> dict[str, list[nn.Parameter]]:
    """``task.optimizers()`` as lists, or a one-line error: names other than the ``configured`` optimizers, an
    empty group, a frozen parameter, one of no module in ``modules`` (it would not be checkpointed), or one
    in two groups."""
    names = set(groups)
    if names != configured:
        raise ConfigError(
            f"task optimizers {sorted(names)} do not match the optimizer configs {sorted(configured)}"
        )
    owned = {id(p) for m in modules.values() for p in m.parameters()}
    seen: dict[int, str] = {}
    checked = {}
    for name, params in groups.items():
        if not NAME_PATTERN.match(name):
            raise ValueError(f"optimizer name {name!r} must use only letters, digits, '_', '-' and '.'")
        params = list(params)
        if not params:
            raise ValueError(f"optimizer '{name}' has no parameters")
        for param in params:
            if not param.requires_grad:
                raise ValueError(f"optimizer '{name}' holds a parameter with requires_grad=False")
            if id(param) not in owned:
                raise ValueError(
                    f"optimizer '{name}' holds a parameter of no module in task.modules() "
                    "(it would not be checkpointed)"
                )
            if id(param) in seen:
                raise ValueError(f"a parameter is in both optimizer '{seen[id(param)]}' and '{name}'")
            seen[id(param)] = name
        checked[name] = params
    return checked
