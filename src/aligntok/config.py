"""Typed configuration: dataclasses, YAML files holding only what differs, dotted overrides.

Every config in the project is a dataclass of dataclasses. ``load_config`` merges, in order, the
dataclass defaults, a YAML file and ``key=value`` overrides, with OmegaConf doing the type checking
and rejecting unknown keys; any failure surfaces as a one-line :class:`ConfigError` naming the key.
Each dataclass may define ``validate()`` for constraints between fields (impossible combinations).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aligntok.io import write_text_atomically

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config: unknown key, wrong type, impossible combination. The message is one line."""


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0].strip()
    if isinstance(exc, Exception) and type(exc).__name__ == "ConfigKeyError":
        return f"unknown config key '{key}'" if key else msg
    return f"config key '{key}': {msg}" if key else msg


def _validate(obj: Any, prefix: str = "") -> None:
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        _validate(getattr(obj, f.name), f"{prefix}{f.name}.")
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def load_config(
    cls: type[T],
    path: str | os.PathLike | Sequence[str | os.PathLike | Mapping[str, Any]] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Build ``cls`` from its defaults, YAML files (one path or several; mappings may stand among them),
    merged in order, and dotted ``key=value`` overrides."""
    sources = [] if path is None else [path] if isinstance(path, (str, os.PathLike)) else list(path)
    try:
        merged = OmegaConf.structured(cls)
        for source in sources:
            if isinstance(source, Mapping):
                merged = OmegaConf.merge(merged, OmegaConf.create(dict(source)))
                continue
            p = Path(source)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            try:
                data = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{p}: top level must be a mapping of keys")
            merged = OmegaConf.merge(merged, OmegaConf.create(data))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    _validate(cfg)
    return cfg  # type: ignore[return-value]


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def config_to_dict(cfg: Any) -> dict:
    """A plain dict of builtins (lists, dicts, numbers, strings), for YAML/JSON."""
    return _plain(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))


def config_from_dict(cls: type[T], data: dict) -> T:
    """Rebuild a config from :func:`config_to_dict` output, with the same checks as a file."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(data)))
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    _validate(cfg)
    return cfg  # type: ignore[return-value]


#: the last part of config keys that change how a run goes, not what it computes
RUN_ONLY_KEYS = frozenset({"num_workers", "log_every", "ckpt_every", "keep_last", "tensorboard", "wandb"})


def config_changes(old: dict, new: dict, ignore: Collection[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between two nested config dicts (e.g. :func:`config_to_dict`
    output or a loaded config.yaml): ``{"model.latent_channels": (16, 8), ...}``, sorted by key; keys whose last
    part is in ``ignore`` (e.g. :data:`RUN_ONLY_KEYS`) are left out."""

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix.rstrip("."): tree}
        return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    a, b = flat(old), flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k.rsplit(".", 1)[-1] not in ignore}


def describe_changes(changes: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    """``key: old -> new, ...`` for :func:`config_changes` output, the first ``limit`` of them."""
    text = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in list(changes.items())[:limit])
    return text + (f" (+{len(changes) - limit} more)" if len(changes) > limit else "")


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (every field, defaults included)."""
    write_text_atomically(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise a one-line ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


# ---------------------------------------------------------------------------------------------
# Configs shared by every trainer. Model configs live beside their models.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataConfig:
    """Where training images come from and how they are prepared."""

    train: str = "builtin:shapes"  #: data spec: image folder, WebDataset shards 'dir/{000000..000009}.tar', or builtin:NAME
    resolution: int = 256  #: square side in pixels after ADM center crop
    hflip: bool = False  #: random horizontal flip
    num_workers: int = 2  #: DataLoader workers per rank
    builtin_size: int = 10000  #: number of images a builtin:NAME dataset holds

    def validate(self) -> None:
        if self.resolution <= 0 or self.num_workers < 0 or self.builtin_size <= 0:
            raise ConfigError("resolution and builtin_size must be positive, num_workers >= 0")


@dataclasses.dataclass
class OptimConfig:
    """One AdamW optimizer and its learning-rate schedule."""

    lr: float = 1e-4  #: peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)  #: AdamW betas
    weight_decay: float = 0.0  #: AdamW decoupled weight decay
    eps: float = 1e-8  #: AdamW epsilon
    warmup_steps: int = 0  #: linear warm-up from 0 to lr over this many steps
    schedule: str = "constant"  #: after warm-up: constant | cosine | linear (decay to min_lr_ratio * lr)
    min_lr_ratio: float = 0.0  #: final lr / peak lr for cosine and linear schedules
    grad_clip: float = 0.0  #: max global grad norm; 0 disables clipping

    def validate(self) -> None:
        check_choice("schedule", self.schedule, ("constant", "cosine", "linear"))
        if self.lr < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("lr, warmup_steps and grad_clip must be >= 0")


@dataclasses.dataclass
class TrainConfig:
    """The training loop: length, batch, precision, EMA, logging and checkpoints."""

    steps: int = 1000  #: optimizer steps to train
    batch_size: int = 32  #: global batch (all ranks, all accumulation micro-steps)
    grad_accum: int = 1  #: micro-steps per optimizer step
    precision: str = "auto"  #: fp32 | bf16 (autocast) | auto (bf16 on CUDA, fp32 on CPU)
    seed: int = 0  #: seeds data order, augmentation and model RNG
    ema_decay: float = 0.0  #: EMA decay of trained weights; 0 disables EMA
    ema_warmup: bool = False  #: decay min(ema_decay, (1+n)/(10+n)) at update n (LDM's LitEma), for short runs
    log_every: int = 10  #: steps between log lines / JSONL records
    ckpt_every: int = 500  #: steps between checkpoints (one is always written at the end)
    keep_last: int = 3  #: complete checkpoints kept on disk
    max_nonfinite: int = 20  #: consecutive non-finite steps after which the run stops
    tensorboard: bool = False  #: also log to TensorBoard (needs the tensorboard package)
    wandb: bool = False  #: also log to Weights & Biases (needs the wandb package)
    fsdp: bool = False  #: shard trained modules with FSDP2 instead of replicating them

    def validate(self) -> None:
        check_choice("precision", self.precision, ("fp32", "bf16", "auto"))
        if self.steps < 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("steps >= 0, batch_size > 0 and grad_accum > 0 are required")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if self.keep_last < 1 or self.ckpt_every < 1 or self.log_every < 1:
            raise ConfigError("keep_last, ckpt_every and log_every must be >= 1")
