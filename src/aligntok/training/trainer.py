"""The one training loop every model in aligntok goes through.

The engine knows nothing of losses. A :class:`Task` names the modules to checkpoint, the parameter
groups that get one AdamW each, the modules that keep an EMA, and returns per-optimizer losses for a
micro-batch. The :class:`Trainer` does the rest: gradient accumulation, gradient sync across ranks
(a coalesced all-reduce, or FSDP2 with ``train.fsdp``), non-finite detection agreed by every rank,
clipping, warm-up + decay schedules, EMA, bf16 autocast, logging, and atomic checkpoints with exact
resume (weights, EMA, optimizers, schedulers, step, RNG states and data position).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Collection, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from aligntok.config import (
    RUN_ONLY_KEYS,
    ConfigError,
    OptimConfig,
    TrainConfig,
    config_changes,
    describe_changes,
    save_config,
)
from aligntok.errors import TrainingAborted  # the CLI prints it as one line
from aligntok.training import checkpoint as ckpt
from aligntok.training import distributed
from aligntok.training.distributed import DistInfo
from aligntok.training.ema import ModuleEMA, swapped_in
from aligntok.training.logging import (
    LOG_FILE,
    RunLogger,
    require_backends,
    truncate_log,
)
from aligntok.training.optim import lr_factor, make_adamw
from aligntok.training.task import (
    SKIPPED_KEY,
    FitResult,
    LoaderFactory,
    LossOutput,
    Task,
    checked_modules,
    checked_param_groups,
    split_batch,
)

__all__ = ["SKIPPED_KEY", "FitResult", "Task", "Trainer", "TrainingAborted", "split_batch"]

log = logging.getLogger(__name__)

def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


@dataclasses.dataclass
class _StepOutcome:
    skipped_reason: str | None
    losses: dict[str, float]
    grad_norms: dict[str, float]


class _Interval:
    """Sums of logged values between two log records."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.seconds = 0.0
        self.skipped_images: list[str] = []

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1


class Trainer:
    """Trains a :class:`Task` to ``train.steps`` optimizer steps, resuming from ``out_dir`` if possible."""

    def __init__(
        self,
        task: Task,
        *,
        train: TrainConfig,
        optim: Mapping[str, OptimConfig],
        loader_factory: LoaderFactory,
        out_dir: str | Path,
        run_config: Any = None,
        dist: DistInfo | None = None,
    ) -> None:
        self.task = task
        self.train = train
        self.optim_configs = dict(optim)
        self.loader_factory = loader_factory
        self.out_dir = Path(out_dir)
        if run_config is not None and not (
            dataclasses.is_dataclass(run_config) and not isinstance(run_config, type)
        ):
            raise ValueError(
                f"run_config must be a dataclass config instance, got {type(run_config).__name__}"
            )
        self.run_config = run_config
        self.dist = dist if dist is not None else distributed.init_distributed()
        self.device = self.dist.device
        self._check_config()
        require_backends(train.tensorboard, train.wandb)

        self.modules = checked_modules(task.modules())
        ema_names = list(task.ema_modules()) if train.ema_decay > 0 else []
        unknown = [n for n in ema_names if n not in self.modules]
        if unknown:
            raise ValueError(f"task.ema_modules() names {unknown}, which task.modules() does not list")
        for module in self.modules.values():
            module.to(self.device)
            distributed.broadcast_module_state(module)  # replicas (and FSDP shards) start from rank 0
        # EMA copies are taken before sharding and then sharded the same way as their module.
        self.emas = {
            name: ModuleEMA(self.modules[name], train.ema_decay, warmup=train.ema_warmup) for name in ema_names
        }
        self.fsdp = train.fsdp and self.dist.world_size > 1
        if self.fsdp:
            for name, module in self.modules.items():
                if any(p.requires_grad for p in module.parameters()):
                    distributed.fsdp_shard(module)
                    if name in self.emas:
                        distributed.fsdp_shard(self.emas[name].module)

        # Parameters are read after sharding: FSDP2 replaces them with DTensor parameters.
        self.params = checked_param_groups(task.optimizers(), set(self.optim_configs), self.modules)
        # Under FSDP, per optimizer: the trainable parameters whose gradients its loss must not touch.
        trainable = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        self._trainable_outside: dict[str, list[nn.Parameter]] = {}
        for name, params in self.params.items() if self.fsdp else ():
            mine = {id(p) for p in params}
            self._trainable_outside[name] = [p for p in trainable if id(p) not in mine]
        self.optimizers = {
            name: make_adamw(params, self.optim_configs[name]) for name, params in self.params.items()
        }
        self.schedulers = {
            name: LambdaLR(opt, self._schedule(self.optim_configs[name]))
            for name, opt in self.optimizers.items()
        }
        if train.precision == "bf16" or (train.precision == "auto" and self.device.type == "cuda"):
            self.autocast_dtype: torch.dtype | None = torch.bfloat16
        else:
            self.autocast_dtype = None

        #: lr of each optimizer's most recent step (logged; the scheduler already holds the next one)
        self.lr_used = {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.skipped_images_total = 0
        self._logger: RunLogger | None = None

    # ------------------------------------------------------------------------------------------
    # Construction checks
    # ------------------------------------------------------------------------------------------

    def _check_config(self) -> None:
        world, accum = self.dist.world_size, self.train.grad_accum
        if self.train.batch_size % (world * accum):
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} is not divisible by "
                f"world_size * grad_accum = {world} * {accum}"
            )
        if self.train.max_nonfinite < 1:
            raise ConfigError(f"train.max_nonfinite={self.train.max_nonfinite} must be >= 1")

    def _schedule(self, cfg: OptimConfig) -> Callable[[int], float]:
        total = self.train.steps
        return lambda step: lr_factor(step, cfg, total)

    # ------------------------------------------------------------------------------------------
    # EMA access (for export)
    # ------------------------------------------------------------------------------------------

    def model_state_dict(self, name: str) -> dict[str, Tensor]:
        """Full weights of module ``name`` on the CPU (gathered, so collective, under FSDP)."""
        return distributed.full_cpu_state(self.modules[name].state_dict())

    def ema_state_dict(self, name: str) -> dict[str, Tensor]:
        """Full fp32 EMA weights of module ``name`` on the CPU (gathered, so collective, under FSDP)."""
        if name not in self.emas:
            raise KeyError(f"module '{name}' keeps no EMA (ema_decay={self.train.ema_decay})")
        return distributed.full_cpu_state(self.emas[name].module.state_dict())

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the block every module with an EMA holds its EMA weights (a no-op without EMA).

        Under FSDP the modules stay sharded; export with :meth:`ema_state_dict` there instead.
        """
        with contextlib.ExitStack() as stack:
            for name, ema in self.emas.items():
                stack.enter_context(swapped_in(self.modules[name], ema))
            yield

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data_position": self.step,  # loader_factory(step) resumes the data stream here
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "skipped_images": self.skipped_images_total,
            "ema_updates": {name: ema.num_updates for name, ema in self.emas.items()},
            "world_size": self.dist.world_size,
            "batch_size": self.train.batch_size,
            "optimizers": sorted(self.optimizers),
        }

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current state. Collective: every rank calls it."""
        # Gathering is collective under FSDP, so every rank builds the payload; rank 0 writes it.
        payload = ckpt.CheckpointPayload(
            models={name: self.model_state_dict(name) for name in self.modules},
            emas={name: self.ema_state_dict(name) for name in self.emas},
            optimizers={name: distributed.full_cpu_state(opt.state_dict()) for name, opt in self.optimizers.items()},
            schedulers={name: sched.state_dict() for name, sched in self.schedulers.items()},
            trainer_state=self._trainer_state(),
            config_yaml=self._config_yaml(),
        )
        return ckpt.write_checkpoint(
            self.out_dir,
            self.step,
            payload if self.dist.is_main else None,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            device=self.device,
            keep_last=self.train.keep_last,
        )

    def _config_yaml(self) -> str | None:
        if self.run_config is None:
            return None
        import yaml

        from aligntok.config import config_to_dict

        return yaml.safe_dump(config_to_dict(self.run_config), sort_keys=False)

    def load_checkpoint(self, path: Path) -> None:
        """Restore every piece of training state from checkpoint directory ``path``.

        Raises a one-line ValueError, before anything is loaded, when this run cannot continue that one:
        another ``train.batch_size`` (the data position counts batches, so data would be skipped or
        repeated) or modules of another shape (naming the config keys that changed, when it can).
        """
        state = ckpt.read_trainer_state(path)
        written_batch = state.get("batch_size", self.train.batch_size)
        if written_batch != self.train.batch_size:
            raise ValueError(
                f"cannot resume from {path}: it was written with train.batch_size={written_batch}, this run has "
                f"train.batch_size={self.train.batch_size}, and the data position counts batches (data would be "
                f"skipped or repeated); resume with train.batch_size={written_batch} or start a new run directory"
            )
        emas = {name: ema.module for name, ema in self.emas.items()}
        for prefix, what, modules in (("model", "weights", self.modules), ("ema", "EMA", emas)):
            for name, module in modules.items():
                file = ckpt.require_file(path / f"{prefix}_{name}.safetensors", f"{what} of module '{name}'")
                problem = ckpt.describe_state_mismatch(ckpt.state_shapes(module), ckpt.tensor_shapes(file))
                if problem:
                    changed = describe_changes(self._changes_since(path)) or "none recorded"
                    raise ValueError(
                        f"cannot resume from {path}: module '{name}' has another shape than there ({problem}); "
                        f"config changes since: {changed}. Restore the model's settings or start a new run directory"
                    )
        for name, module in self.modules.items():
            distributed.load_module_state(module, ckpt.load_tensors(path / f"model_{name}.safetensors"))
        for name, ema in self.emas.items():
            distributed.load_module_state(ema.module, ckpt.load_tensors(path / f"ema_{name}.safetensors"))
            ema.num_updates = int(state["ema_updates"].get(name, 0))
        for name, optimizer in self.optimizers.items():
            file = ckpt.require_file(path / f"optimizer_{name}.pt", f"state of optimizer '{name}'")
            distributed.load_optimizer_state(optimizer, ckpt.load_state(file))
        for name, scheduler in self.schedulers.items():
            file = ckpt.require_file(path / f"scheduler_{name}.pt", f"schedule of optimizer '{name}'")
            scheduler.load_state_dict(ckpt.load_state(file))
        self.step = int(state["step"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.skipped_images_total = int(state["skipped_images"])
        rng = ckpt.read_rng_state(path, self.dist.rank)
        if rng is None:  # resumed on more ranks than wrote the checkpoint
            ckpt.seed_everything(self.train.seed + self.dist.rank + 1_000_003 * self.step)
        else:
            ckpt.restore_rng_state(rng, self.device)

    def warm_start_optimizer(self, name: str, checkpoint: Path) -> None:
        """Take optimizer ``name``'s per-parameter state (Adam moments, step counts) from another run's
        checkpoint directory, keeping this run's hyperparameters and schedule.

        For a module carried over from that run (e.g. the discriminator from the previous tokenizer stage);
        call before :meth:`fit`. Resuming from this run's own checkpoint replaces it.
        """
        optimizer = self.optimizers[name]
        file = ckpt.require_file(Path(checkpoint) / f"optimizer_{name}.pt", f"state of optimizer '{name}'")
        saved = ckpt.load_state(file)
        current = optimizer.state_dict()
        saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
        current_sizes = [len(group["params"]) for group in current["param_groups"]]
        if saved_sizes != current_sizes:
            raise ValueError(
                f"optimizer '{name}' in {checkpoint} holds parameter groups of sizes {saved_sizes}, this run's "
                f"{current_sizes}: the module changed shape"
            )
        distributed.load_optimizer_state(optimizer, {**current, "state": saved["state"]})

    def _restore(self) -> int | None:
        """Resume from the newest complete checkpoint (returning its step), else seed a fresh run."""
        if self.dist.is_main:
            for stale in ckpt.remove_stale_temp_dirs(self.out_dir):
                log.warning("removed an interrupted checkpoint write: %s", stale)
        distributed.barrier()
        latest = ckpt.latest_checkpoint(self.out_dir) if self.dist.is_main else None
        latest = distributed.broadcast_object(str(latest) if latest else None)
        if latest is None:
            ckpt.seed_everything(self.train.seed + self.dist.rank)
            return None
        self.load_checkpoint(Path(latest))
        self._check_resume(Path(latest))
        return self.step

    def _changes_since(self, checkpoint: Path, ignore: Collection[str] = ()) -> dict[str, tuple[Any, Any]]:
        """This run's config against the one ``checkpoint`` recorded (:func:`aligntok.config.config_changes`);
        empty when either is unknown."""
        import yaml

        saved, current = checkpoint / ckpt.CONFIG_FILE, self._config_yaml()
        if current is None or not saved.is_file():
            return {}
        return config_changes(yaml.safe_load(saved.read_text()), yaml.safe_load(current), ignore=ignore)

    def _check_resume(self, checkpoint: Path) -> None:
        """Refuse fewer steps than the checkpoint's (the later weights would be exported under this config), and
        other settings (beyond the step count and how the run is logged) when the checkpoint is the run's last:
        nothing would train with them. Other settings while training continues are logged."""
        if self.step > self.train.steps:
            raise ValueError(
                f"cannot train {self.out_dir} to train.steps={self.train.steps}: its latest checkpoint is at step "
                f"{self.step}; use train.steps >= {self.step}, or a new run directory"
            )
        changes = self._changes_since(checkpoint, ignore=RUN_ONLY_KEYS | {"steps"})
        if not changes:
            return
        if self.step == self.train.steps:
            raise ValueError(
                f"{self.out_dir} finished at step {self.step} with other settings ({describe_changes(changes)}); "
                f"nothing would train with these: use a new run directory, or delete {self.out_dir} to train again"
            )
        log.warning("resuming %s at step %d with other settings than its checkpoint's: %s", self.out_dir, self.step,
                    describe_changes(changes))

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train to ``train.steps``, resuming from ``out_dir``'s newest complete checkpoint if any."""
        resumed_from = self._restore()
        main = self.dist.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.run_config is not None:
                save_config(self.run_config, self.out_dir / ckpt.CONFIG_FILE)
            truncate_log(self.out_dir / LOG_FILE, self.step)
        self._logger = RunLogger(
            self.out_dir,
            enabled=main,
            total_steps=self.train.steps,
            start_step=self.step,
            tensorboard=self.train.tensorboard,
            wandb=self.train.wandb,
            run_config=self.run_config,
        )
        if resumed_from is not None:
            self._logger.warn(f"resumed from step {resumed_from} in {self.out_dir}")
        train_mode = getattr(self.task, "train_mode", None)
        if callable(train_mode):
            train_mode()
        else:
            for module in self.modules.values():
                module.train()
        try:
            self._loop()
        finally:
            self._logger.close()
        latest = ckpt.latest_checkpoint(self.out_dir) if main else None
        return FitResult(self.step, resumed_from, self.nonfinite_total, self.skipped_images_total, latest)

    def _batches(self) -> Generator[dict, None, None]:
        """The data stream from the current step; a finished iterator is reopened at the step it reached."""
        step = self.step
        while True:
            produced = False
            for batch in self.loader_factory(step):
                produced = True
                step += 1
                yield batch
            if not produced:
                raise ValueError(f"the data loader yielded no batch at step {step}")

    def _loop(self) -> None:
        if self.step >= self.train.steps:
            return
        batches = self._batches()
        try:
            self._run_steps(batches)
        finally:
            batches.close()  # releases the loader (and its worker processes) now, not at garbage collection

    def _run_steps(self, batches: Iterator[dict]) -> None:
        assert self._logger is not None
        train = self.train
        per_rank_batch = train.batch_size // self.dist.world_size
        interval = _Interval()
        while self.step < train.steps:
            started = time.perf_counter()
            batch = next(batches)
            if not isinstance(batch, dict):
                raise ValueError(f"the data loader must yield dicts, got {type(batch).__name__}")
            skipped = list(batch.pop(SKIPPED_KEY, None) or [])
            micro_batches = split_batch(_to_device(batch, self.device), train.grad_accum, per_rank_batch)
            outcome = self._train_step(micro_batches, self.step)
            self.step += 1
            interval.seconds += time.perf_counter() - started
            interval.steps += 1
            interval.skipped_images.extend(str(name) for name in skipped)
            if outcome.skipped_reason is None:
                self.nonfinite_in_a_row = 0
                interval.add(outcome.losses)
                interval.add({f"grad_norm/{k}": v for k, v in outcome.grad_norms.items()})
                self._logger.progress(
                    self.step, {k: v for k, v in outcome.losses.items() if k.endswith("/loss")}
                )
            else:
                self.nonfinite_total += 1
                self.nonfinite_in_a_row += 1
                self._logger.progress(self.step, {})
                self._logger.warn(
                    f"step {self.step}: {outcome.skipped_reason}, step skipped "
                    f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in total)"
                )
            aborting = self.nonfinite_in_a_row >= train.max_nonfinite
            if aborting or self.step % train.log_every == 0 or self.step == train.steps:
                self._write_log(interval)
                interval = _Interval()
            if aborting:
                last = ckpt.latest_checkpoint(self.out_dir) if self.dist.is_main else None
                raise TrainingAborted(
                    f"training stopped at step {self.step}: {train.max_nonfinite} consecutive non-finite "
                    f"steps (train.max_nonfinite); last good checkpoint: {last or 'none'}"
                )
            if self.step % train.ckpt_every == 0 or self.step == train.steps:
                self.save_checkpoint()

    def _write_log(self, interval: _Interval) -> None:
        """Average the interval over steps and ranks, and hand one record to the logger (rank 0)."""
        assert self._logger is not None
        gathered = distributed.gather_objects((interval.sums, interval.counts, interval.skipped_images))
        if gathered is None:  # not rank 0
            return
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        skipped_images: list[str] = []
        for rank_sums, rank_counts, rank_skipped in gathered:
            for key, value in rank_sums.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + rank_counts[key]
            skipped_images.extend(rank_skipped)
        self.skipped_images_total += len(skipped_images)
        self._logger.add_skipped_images(skipped_images)
        step_time = interval.seconds / max(1, interval.steps)
        record: dict[str, Any] = {"step": self.step}
        record.update({key: sums[key] / counts[key] for key in sorted(sums)})
        record.update({f"lr/{name}": lr for name, lr in self.lr_used.items()})
        record.update(
            nonfinite_steps=self.nonfinite_total,
            skipped_images=self.skipped_images_total,
            step_time=step_time,
            samples_per_s=self.train.batch_size / step_time if step_time > 0 else 0.0,
        )
        self._logger.log(record)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _train_step(self, micro_batches: list[dict], step: int) -> _StepOutcome:
        """One optimizer step: accumulate, agree across ranks, sync, check, clip, step, schedule, EMA."""
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        present, logged = self._accumulate(micro_batches, step)
        loss_is_finite, has_grad_anywhere = self._agree(present, logged, step)
        values = _to_floats(logged)
        if not loss_is_finite:
            bad = sorted(n for n in present if not math.isfinite(values[f"{n}/loss"]))
            return _StepOutcome(
                f"non-finite loss ({', '.join(bad) if bad else 'on another rank'})", values, {}
            )
        if not self.fsdp:
            for name in present:
                distributed.all_reduce_gradients(self.params[name], has_grad_anywhere[name])
        # After the sync every rank holds the same gradients, so the norms' finiteness agrees too.
        norms = {name: self._grad_norm(name) for name in present}
        norm_values = _to_floats({name: _local(norm) for name, norm in norms.items()})
        bad = sorted(name for name, v in norm_values.items() if not math.isfinite(v))
        if bad:
            return _StepOutcome(f"non-finite gradient ({', '.join(bad)})", values, norm_values)
        for name in present:
            clip = self.optim_configs[name].grad_clip
            if clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params[name], clip, norms[name])
            self.lr_used[name] = self.optimizers[name].param_groups[0]["lr"]
            self.optimizers[name].step()
            self.schedulers[name].step()
        for name, ema in self.emas.items():
            ema.update_parameters(self.modules[name])
        return _StepOutcome(None, values, norm_values)

    def _accumulate(self, micro_batches: list[dict], step: int) -> tuple[list[str], dict[str, Tensor]]:
        """Forward and backward every micro-batch; returns the optimizers that have a loss and the
        logged values (``{opt}/loss`` and ``{opt}/{part}``, averaged over micro-batches, on device)."""
        accum = len(micro_batches)
        present: list[str] | None = None
        logged: dict[str, Tensor] = {}
        for micro in micro_batches:
            with self._autocast():
                losses = self.task.losses(micro, step)
            present = self._check_losses(losses, step, present)
            for position, name in enumerate(present):
                loss, parts = losses[name]
                if "loss" in parts:
                    raise ValueError(
                        f"task.losses()['{name}'] logs a part named 'loss', which names the total"
                    )
                self._backward(name, loss / accum, retain_graph=position < len(present) - 1)
                contributions = {f"{name}/loss": loss.detach().float()}
                contributions.update(
                    {f"{name}/{k}": _scalar(v, f"{name}/{k}", self.device) for k, v in parts.items()}
                )
                for key, value in contributions.items():
                    logged[key] = logged[key] + value / accum if key in logged else value / accum
        assert present is not None
        return present, logged

    def _agree(
        self, present: list[str], logged: dict[str, Tensor], step: int
    ) -> tuple[bool, dict[str, list[bool]]]:
        """One small all-reduce so every rank agrees on: whether some rank saw a non-finite loss, which
        optimizers step, and which parameters have a gradient on some rank (elsewhere they join as 0)."""
        losses = [logged[f"{name}/loss"] for name in present]
        finite = torch.stack(losses).isfinite().all() if losses else torch.tensor(True, device=self.device)
        flags = [(~finite).float().reshape(1).to(self.device)]
        flags.append(torch.tensor([float(n in present) for n in self.optimizers], device=self.device))
        if not self.fsdp:  # FSDP's reduce-scatter handles missing gradients itself
            has_grad = [float(p.grad is not None) for n in self.optimizers for p in self.params[n]]
            flags.append(torch.tensor(has_grad, device=self.device))
        agreed = distributed.all_reduce_sum(torch.cat(flags)).cpu()
        presence = agreed[1 : 1 + len(self.optimizers)]
        if not bool(((presence == 0) | (presence == self.dist.world_size)).all()):
            raise RuntimeError(
                f"task.losses() returned different optimizer names on different ranks at step {step}; "
                "which names are present must depend only on the step"
            )
        has_grad_anywhere: dict[str, list[bool]] = {}
        offset = 1 + len(self.optimizers)
        for name in self.optimizers:
            count = len(self.params[name])
            has_grad_anywhere[name] = (agreed[offset : offset + count] > 0).tolist()
            offset += count
        return bool(agreed[0] == 0), has_grad_anywhere

    def _backward(self, name: str, loss: Tensor, retain_graph: bool) -> None:
        """Backpropagate optimizer ``name``'s loss into that optimizer's parameters only.

        Replicated: ``inputs=`` restricts autograd to them, so e.g. a generator's adversarial loss
        computes no discriminator gradient at all. FSDP2 cannot use ``inputs=``: the forward runs on
        unsharded copies of the parameters that exist only during forward/backward. There the other
        parameters' gradients are set aside, the backward runs in full (FSDP reduce-scatters it), and
        whatever reached the other parameters is discarded.
        """
        if not self.fsdp:
            torch.autograd.backward(loss, inputs=self.params[name], retain_graph=retain_graph)
            return
        others = self._trainable_outside[name]
        saved = [p.grad for p in others]
        for param in others:
            param.grad = None
        torch.autograd.backward(loss, retain_graph=retain_graph)
        for param, grad in zip(others, saved, strict=True):
            param.grad = grad

    def _grad_norm(self, name: str) -> Tensor:
        grads = [p.grad for p in self.params[name] if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)

    def _check_losses(self, losses: LossOutput, step: int, previous: list[str] | None) -> list[str]:
        if not isinstance(losses, Mapping):
            raise ValueError(
                f"task.losses() must return a dict name -> (loss, parts), got {type(losses).__name__}"
            )
        names = list(losses)
        unknown = [n for n in names if n not in self.optimizers]
        if unknown:
            raise ValueError(
                f"task.losses() names unknown optimizers {unknown}; known: {sorted(self.optimizers)}"
            )
        if previous is not None and names != previous:
            raise ValueError(
                f"task.losses() returned {names} for one micro-batch of step {step}, {previous} for another"
            )
        for name in names:
            entry = losses[name]
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise ValueError(f"task.losses()['{name}'] must be a (loss, parts) tuple")
            loss = entry[0]
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"task.losses()['{name}'] loss must be a scalar tensor")
            if not loss.requires_grad:
                raise ValueError(
                    f"task.losses()['{name}'] does not require grad: no trained parameter produced it"
                )
        return names


def _scalar(value: Tensor | float, key: str, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"logged part '{key}' must be a scalar, got shape {tuple(value.shape)}")
        return value.detach().float().reshape(()).to(device)
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), device=device)
    raise ValueError(f"logged part '{key}' must be a tensor or a number, got {type(value).__name__}")


def _to_floats(values: dict[str, Tensor]) -> dict[str, float]:
    """Scalars to Python floats with a single device-to-host copy."""
    if not values:
        return {}
    host = torch.stack([v.to(torch.float32) for v in values.values()]).cpu().tolist()
    return dict(zip(values, host, strict=True))


def _local(norm: Tensor) -> Tensor:
    """A grad norm as a plain tensor (FSDP returns a DTensor whose full value needs a collective)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
