"""Training logs: a rank-0 progress bar, ``log.jsonl``, optional TensorBoard / W&B, skipped inputs.

Only rank 0 creates a :class:`RunLogger` that writes anything; the others get a disabled one, so the
trainer calls the same methods everywhere. TensorBoard and W&B are imported only when enabled, and a
missing package is a one-line :class:`~aligntok.config.ConfigError` raised before training starts.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from aligntok.config import ConfigError, config_to_dict
from aligntok.io import write_text_atomically
from aligntok.progress import progress_bar

LOG_FILE = "log.jsonl"
SKIPPED_IMAGES_FILE = "skipped_images.txt"
TENSORBOARD_DIR = "tensorboard"


def require_backends(tensorboard: bool, wandb: bool) -> None:
    """Fail fast, in one line, when an enabled logging backend is not installed."""
    wanted = {
        "tensorboard": ("train.tensorboard", "torch.utils.tensorboard"),
        "wandb": ("train.wandb", "wandb"),
    }
    for package, enabled in (("tensorboard", tensorboard), ("wandb", wandb)):
        if not enabled:
            continue
        key, module = wanted[package]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"{key}=true needs the '{package}' package: pip install {package}") from None


def truncate_log(path: Path, last_step: int) -> None:
    """Drop JSONL records past ``last_step`` (written by a run that died after its last checkpoint),
    so a resumed run's log reads as one uninterrupted run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except ValueError:
            continue  # a torn last line from a killed process
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def _jsonable(value: Any) -> Any:
    # JSON has no NaN/inf; a non-finite number is logged as its string so the file stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    """Progress bar, JSONL records and optional TensorBoard / W&B for one run (active on rank 0 only)."""

    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        tensorboard: bool = False,
        wandb: bool = False,
        run_config: Any = None,
    ) -> None:
        self.out_dir = out_dir
        self.enabled = enabled
        self._bar = None
        self._jsonl = None
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        require_backends(tensorboard, wandb)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(out_dir / LOG_FILE, "a", encoding="utf-8")
        self._bar = progress_bar(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR))
        if wandb:
            import wandb as wandb_module

            config = config_to_dict(run_config) if run_config is not None else None
            self._wandb = wandb_module.init(
                project="aligntok", name=out_dir.name, dir=str(out_dir), config=config
            )

    def progress(self, step: int, postfix: dict[str, float]) -> None:
        """Move the bar to ``step`` completed steps, showing the main loss values."""
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold ``step``) to every enabled sink."""
        if not self.enabled:
            return
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._jsonl.flush()
        step = int(record["step"])
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def warn(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def add_skipped_images(self, names: list[str]) -> None:
        """Append input files the data layer skipped (unreadable images) to ``skipped_images.txt``."""
        if not self.enabled or not names:
            return
        with open(self.out_dir / SKIPPED_IMAGES_FILE, "a", encoding="utf-8") as f:
            f.writelines(f"{name}\n" for name in names)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._bar = self._jsonl = self._tensorboard = self._wandb = None
