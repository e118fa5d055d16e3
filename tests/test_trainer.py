"""The training engine: exact resume, non-finite handling, gradient isolation, EMA, schedules, logs.

The toy task and loader defined here are also used by test_checkpoint.py and test_distributed.py
(and by the scripts those tests run in subprocesses), so they live at module level.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from aligntok.config import ConfigError, OptimConfig, TrainConfig
from aligntok.training.distributed import DistInfo
from aligntok.training.ema import ModuleEMA, warmup_decay
from aligntok.training.optim import lr_factor, make_adamw
from aligntok.training.trainer import Trainer, TrainingAborted, split_batch

FEATURES = 4


class ToyDiscriminator(nn.Module):
    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(FEATURES, FEATURES) for _ in range(blocks)])
        self.head = nn.Linear(FEATURES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


class ToyTask:
    """A tiny generator (with EMA) and discriminator, trained GAN-style with noise inside the loss."""

    def __init__(
        self,
        *,
        seed: int = 0,
        noise: bool = True,
        disc_start: int = 2,
        nan_steps: tuple[int, ...] = (),
        blocks: int = 1,
    ) -> None:
        torch.manual_seed(seed)
        self.gen = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, FEATURES))
        self.disc = ToyDiscriminator(blocks)
        self.noise, self.disc_start, self.nan_steps = noise, disc_start, set(nan_steps)
        #: generator weights at the start of each step (after that many updates), by step
        self.seen_gen_weights: dict[int, dict[str, torch.Tensor]] = {}

    def modules(self) -> dict[str, nn.Module]:
        return {"gen": self.gen, "disc": self.disc}

    def optimizers(self) -> dict[str, list[nn.Parameter]]:
        return {"generator": list(self.gen.parameters()), "discriminator": list(self.disc.parameters())}

    def ema_modules(self) -> list[str]:
        return ["gen"]

    def losses(self, batch: dict, step: int):
        if step not in self.seen_gen_weights:
            self.seen_gen_weights[step] = {k: v.detach().clone() for k, v in self.gen.state_dict().items()}
        x = batch["x"]
        noisy = x + 0.1 * torch.randn_like(x) if self.noise else x
        recon = self.gen(noisy)
        rec = (recon - x).abs().mean()
        adv = -self.disc(recon).mean()
        gen_loss = rec + 0.1 * adv
        if step in self.nan_steps:
            gen_loss = gen_loss * float("nan")
        out = {"generator": (gen_loss, {"rec": rec, "adv": float(adv.detach())})}
        if step >= self.disc_start:
            d_loss = F.relu(1 - self.disc(x)).mean() + F.relu(1 + self.disc(recon.detach())).mean()
            out["discriminator"] = (d_loss, {"hinge": d_loss})
        return out


class Interrupted(Exception):
    """Raised by the loader to stop a run mid-way, as a crash would."""


def toy_loader(
    global_batch: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    stop_at: int | None = None,
    skipped_every: int = 0,
):
    """``loader_factory(start_step)``: batch t is a pure function of t; each rank takes its slice."""
    per_rank = global_batch // world_size

    def factory(start_step: int) -> Iterator[dict]:
        step = start_step
        while True:
            if stop_at is not None and step == stop_at:
                raise Interrupted(f"stopped at step {step}")
            g = torch.Generator().manual_seed(1000 + step)
            x = torch.randn(global_batch, FEATURES, generator=g)[rank * per_rank : (rank + 1) * per_rank]
            batch = {"x": x, "index": list(range(step * global_batch, (step + 1) * global_batch))[:per_rank]}
            if skipped_every and step % skipped_every == 0:
                batch["skipped"] = [f"bad_{step}_{rank}.jpg"]
            yield batch
            step += 1

    return factory


def toy_configs(**train_overrides) -> tuple[TrainConfig, dict[str, OptimConfig]]:
    fields = dict(steps=7, batch_size=8, grad_accum=2, ema_decay=0.9, log_every=1, ckpt_every=3, seed=0)
    fields.update(train_overrides)
    train = TrainConfig(**fields)
    optim = {
        "generator": OptimConfig(
            lr=1e-2, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1, grad_clip=1.0, weight_decay=0.01
        ),
        "discriminator": OptimConfig(lr=2e-2, warmup_steps=1, schedule="linear", betas=(0.5, 0.9)),
    }
    return train, optim


def toy_trainer(
    out_dir: Path, task: ToyTask | None = None, loader=None, dist: DistInfo | None = None, **train_overrides
) -> Trainer:
    train, optim = toy_configs(**train_overrides)
    return Trainer(
        task or ToyTask(),
        train=train,
        optim=optim,
        loader_factory=loader or toy_loader(train.batch_size),
        out_dir=out_dir,
        run_config=train,
        dist=dist or DistInfo(),
    )


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every number that must match after an exact resume, flattened to name -> tensor."""
    state = {}
    for name, module in trainer.modules.items():
        state.update({f"model/{name}/{k}": v for k, v in module.state_dict().items()})
    for name in trainer.emas:
        state.update({f"ema/{name}/{k}": v for k, v in trainer.ema_state_dict(name).items()})
    for name, opt in trainer.optimizers.items():
        for index, values in opt.state_dict()["state"].items():
            state.update({f"optim/{name}/{index}/{k}": torch.as_tensor(v) for k, v in values.items()})
        state[f"lr/{name}"] = torch.tensor(trainer.schedulers[name].get_last_lr())
    return state


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------


def test_lr_schedule_warms_up_linearly_then_decays_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, cfg, 14) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert lr_factor(14, cfg, 14) == pytest.approx(0.1) and lr_factor(50, cfg, 14) == pytest.approx(0.1)
    linear = OptimConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_factor(s, linear, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(3, OptimConfig(schedule="constant"), 4) == 1.0


def test_split_batch_slices_tensors_and_lists_and_keeps_the_rest():
    batch = {
        "x": torch.arange(8).reshape(4, 2),
        "names": list("abcd"),
        "tag": "t",
        "scale": torch.tensor(2.0),
    }
    first, second = split_batch(batch, 2, expected_size=4)
    assert torch.equal(first["x"], batch["x"][:2]) and second["names"] == ["c", "d"]
    assert first["tag"] == "t" and second["scale"] is batch["scale"]
    with pytest.raises(ValueError, match="disagree on the batch size"):
        split_batch({"x": torch.zeros(4, 1), "names": ["a"]}, 2)
    with pytest.raises(ValueError, match="4 samples but 8 were expected"):
        split_batch(batch, 2, expected_size=8)
    with pytest.raises(ValueError, match="cannot be split into 3"):
        split_batch(batch, 3)


def test_interrupted_and_resumed_run_matches_a_straight_run_bitwise(tmp_path):
    straight = toy_trainer(tmp_path / "straight")
    straight.fit()

    # The first attempt dies while fetching the batch of step index 4 (after the checkpoint at 3):
    # step index 3's update is lost and must be redone identically, RNG and data position included.
    crashed = toy_trainer(tmp_path / "resumed", loader=toy_loader(8, stop_at=4))
    with pytest.raises(Interrupted):
        crashed.fit()
    assert crashed.step == 4
    resumed = toy_trainer(tmp_path / "resumed")
    result = resumed.fit()
    assert result.resumed_from == 3 and result.step == 7

    expected, actual = full_state(straight), full_state(resumed)
    assert expected.keys() == actual.keys()
    # Both optimizers stepped (the discriminator from step 2), and EMA and noise were in play.
    assert any(k.startswith("optim/discriminator/") for k in expected)
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"differ after resume: {different}"
    assert resumed.emas["gen"].num_updates == straight.emas["gen"].num_updates == 7

    # The resumed log reads as one run: the records the crashed attempt wrote past step 3 are dropped.
    steps = [r["step"] for r in read_log(tmp_path / "resumed")]
    assert steps == list(range(1, 8))


def test_fewer_steps_than_the_latest_checkpoint_is_refused_and_more_extend_the_run(tmp_path):
    toy_trainer(tmp_path / "run", steps=6).fit()  # checkpoints at 3 and 6
    with pytest.raises(ValueError, match=r"train.steps=4: its latest checkpoint is at step 6; use train.steps >= 6"):
        toy_trainer(tmp_path / "run", steps=4).fit()
    result = toy_trainer(tmp_path / "run", steps=7).fit()
    assert result.resumed_from == 6 and result.step == 7
    # a finished run asked for other settings would train nothing with them: refused, naming them
    with pytest.raises(ValueError, match=r"finished at step 7 with other settings \(ema_decay: 0.9 -> 0.5\)"):
        toy_trainer(tmp_path / "run", steps=7, ema_decay=0.5).fit()
    toy_trainer(tmp_path / "run", steps=7, log_every=2).fit()  # how it logs is no other setting


def test_a_different_data_position_would_be_noticed(tmp_path):
    """Guards the bitwise test above: the comparison is sensitive to the data stream."""
    straight = toy_trainer(tmp_path / "a")
    straight.fit()

    def shifted(start_step: int):
        return toy_loader(8)(start_step + 1)

    other = toy_trainer(tmp_path / "b", loader=shifted)
    other.fit()
    assert not torch.equal(straight.modules["gen"][0].weight, other.modules["gen"][0].weight)


def test_generator_loss_never_puts_gradient_into_the_discriminator(tmp_path):
    task = ToyTask(noise=False, disc_start=0)
    initial = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in task.modules().items()}
    trainer = toy_trainer(tmp_path, task=task, steps=1, grad_accum=1, ema_decay=0.0)
    trainer.fit()

    reference = ToyTask(noise=False, disc_start=0)
    for name, module in reference.modules().items():
        module.load_state_dict(initial[name])
    x = next(toy_loader(8)(0))["x"]
    d_loss, _ = reference.losses({"x": x}, 0)["discriminator"]
    d_loss.backward()  # the discriminator's own loss alone
    for got, want in zip(
        trainer.params["discriminator"], reference.optimizers()["discriminator"], strict=True
    ):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-7)


def test_a_nan_loss_skips_the_step_on_every_optimizer_and_is_counted(tmp_path):
    task = ToyTask(nan_steps=(4,))
    trainer = toy_trainer(tmp_path, task=task, steps=6)
    result = trainer.fit()
    assert result.step == 6 and result.nonfinite_steps == 1
    # Step index 4 changed nothing: the weights step 5 saw equal those step 4 saw.
    seen = task.seen_gen_weights
    assert all(torch.equal(seen[4][k], seen[5][k]) for k in seen[4])
    assert not all(torch.equal(seen[3][k], seen[4][k]) for k in seen[3])
    assert trainer.emas["gen"].num_updates == 5
    gen_state = trainer.optimizers["generator"].state_dict()["state"][0]
    disc_state = trainer.optimizers["discriminator"].state_dict()["state"][0]
    assert int(gen_state["step"]) == 5 and int(disc_state["step"]) == 3  # disc from step 2, minus step 4
    log = {r["step"]: r for r in read_log(tmp_path)}
    assert (
        log[4]["nonfinite_steps"] == 0 and log[5]["nonfinite_steps"] == 1 and log[6]["nonfinite_steps"] == 1
    )
    assert "generator/loss" not in log[5] and math.isfinite(log[6]["generator/loss"])


def test_repeated_nans_stop_the_run_cleanly_and_keep_the_last_good_checkpoint(tmp_path):
    task = ToyTask(nan_steps=tuple(range(4, 100)))
    trainer = toy_trainer(tmp_path, task=task, steps=20, ckpt_every=2, max_nonfinite=3)
    with pytest.raises(TrainingAborted) as info:
        trainer.fit()
    message = str(info.value)
    assert "\n" not in message and "3 consecutive non-finite" in message and "step_00000006" in message
    assert trainer.step == 7
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert checkpoints[-1] == "step_00000006"  # nothing written at the abort
    # Steps 4 and 5 were skipped, so checkpoint 6 holds exactly the weights after step 4.
    saved = load_file(str(tmp_path / "checkpoints" / "step_00000006" / "model_gen.safetensors"))
    after_four = task.seen_gen_weights[4]
    assert saved.keys() == after_four.keys() and all(torch.equal(saved[k], after_four[k]) for k in saved)
    # Re-running resumes from it (and, with the same poisoned task, stops again).
    again = toy_trainer(
        tmp_path, task=ToyTask(nan_steps=tuple(range(4, 100))), steps=20, ckpt_every=2, max_nonfinite=3
    )
    with pytest.raises(TrainingAborted):
        again.fit()
    # The checkpoint carried 2 non-finite steps in a row, so the first step after resuming is the 3rd.
    assert again.step == 7 and again.nonfinite_total == 3


def test_ema_follows_its_formula_and_swaps_in_for_export(tmp_path):
    task = ToyTask(noise=False)
    trainer = toy_trainer(tmp_path, task=task, steps=4, ema_decay=0.5)
    trainer.fit()
    snapshots = [task.seen_gen_weights[step] for step in (1, 2, 3)]
    snapshots.append({k: v.detach().clone() for k, v in task.gen.state_dict().items()})
    expected = dict(snapshots[0])  # the first update copies; later ones blend with weight 1 - decay
    for weights in snapshots[1:]:
        expected = {k: 0.5 * expected[k] + 0.5 * weights[k] for k in expected}
    ema = trainer.ema_state_dict("gen")
    for key in expected:
        torch.testing.assert_close(ema[key], expected[key])
        assert ema[key].dtype == torch.float32
    live = {k: v.clone() for k, v in task.gen.state_dict().items()}
    with trainer.ema_weights():
        assert all(torch.equal(task.gen.state_dict()[k], ema[k]) for k in ema)
    assert all(torch.equal(task.gen.state_dict()[k], live[k]) for k in live)


def test_log_records_parts_lrs_grad_norms_and_skipped_images(tmp_path):
    trainer = toy_trainer(tmp_path, loader=toy_loader(8, skipped_every=2), steps=4, log_every=2)
    trainer.fit()
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    last = records[-1]
    for key in (
        "generator/loss",
        "generator/rec",
        "generator/adv",
        "discriminator/hinge",
        "lr/generator",
        "lr/discriminator",
        "grad_norm/generator",
        "step_time",
        "samples_per_s",
        "nonfinite_steps",
    ):
        assert key in last, key
    assert "discriminator/hinge" not in records[0]  # the discriminator starts at step 2
    assert last["lr/generator"] == pytest.approx(1e-2 * lr_factor(3, trainer.optim_configs["generator"], 4))
    assert (tmp_path / "skipped_images.txt").read_text().split() == ["bad_0_0.jpg", "bad_2_0.jpg"]
    assert last["skipped_images"] == 2
    assert (tmp_path / "config.yaml").is_file()


def test_bf16_autocast_runs_and_keeps_fp32_weights(tmp_path):
    trainer = toy_trainer(tmp_path, steps=2, precision="bf16")
    assert trainer.autocast_dtype == torch.bfloat16
    trainer.fit()
    assert all(p.dtype == torch.float32 for p in trainer.modules["gen"].parameters())
    assert math.isfinite(read_log(tmp_path)[-1]["generator/loss"])


def test_modules_are_put_in_train_mode_or_the_task_chooses(tmp_path):
    task = ToyTask()
    task.gen.eval()
    toy_trainer(tmp_path / "a", task=task, steps=1).fit()
    assert task.gen.training and task.disc.training

    class FrozenDiscriminator(ToyTask):
        def train_mode(self) -> None:
            self.gen.train()
            self.disc.eval()

    task = FrozenDiscriminator()
    toy_trainer(tmp_path / "b", task=task, steps=1).fit()
    assert task.gen.training and not task.disc.training


def test_bad_setups_fail_with_one_line_errors(tmp_path, monkeypatch):
    train, optim = toy_configs()
    with pytest.raises(ConfigError, match=r"task optimizers \['discriminator', 'generator'\] do not match"):
        Trainer(
            ToyTask(),
            train=train,
            optim={"generator": optim["generator"]},
            loader_factory=toy_loader(8),
            out_dir=tmp_path,
            dist=DistInfo(),
        )
    with pytest.raises(ConfigError, match="not divisible by world_size \\* grad_accum = 2 \\* 2"):
        toy_trainer(tmp_path, dist=DistInfo(rank=0, world_size=2), batch_size=6, grad_accum=2)
    with pytest.raises(ValueError, match="7 samples but 8 were expected"):
        toy_trainer(tmp_path / "small", loader=toy_loader(7), grad_accum=1).fit()
    frozen = ToyTask()
    frozen.gen[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="'generator' holds a parameter with requires_grad=False"):
        toy_trainer(tmp_path, task=frozen)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were missing
    with pytest.raises(ConfigError, match="train.tensorboard=true needs the 'tensorboard' package"):
        toy_trainer(tmp_path, tensorboard=True)


def test_resuming_with_another_batch_size_or_model_shape_is_refused_in_one_line(tmp_path):
    toy_trainer(tmp_path / "run", steps=3).fit()  # a checkpoint at step 3, written with batch 8
    with pytest.raises(ValueError) as info:
        toy_trainer(tmp_path / "run", loader=toy_loader(16), steps=6, batch_size=16).fit()
    message = str(info.value)
    assert "written with train.batch_size=8, this run has train.batch_size=16" in message and "\n" not in message
    with pytest.raises(ValueError) as info:
        toy_trainer(tmp_path / "run", task=ToyTask(blocks=2), steps=6).fit()
    message = str(info.value)
    assert "module 'disc' has another shape than there (missing keys: blocks.1.bias, blocks.1.weight)" in message
    assert "config changes since: steps: 3 -> 6" in message and "\n" not in message
    # Nothing was loaded or written by the refused attempts: the original settings resume.
    result = toy_trainer(tmp_path / "run", steps=6).fit()
    assert result.resumed_from == 3 and result.step == 6


def test_ema_warmup_follows_litemas_decay_by_hand():
    live = nn.Linear(1, 1, bias=False)
    ema = ModuleEMA(live, 0.9, warmup=True)
    decays = []
    for value in (0.0, 1.0, 1.0):
        with torch.no_grad():
            live.weight.fill_(value)
        before = ema.module.weight.item()
        ema.update_parameters(live)
        if ema.num_updates > 1:
            decays.append((value - ema.module.weight.item()) / (value - before))
    # update 0 copies (0), update 1 keeps 2/11 of it (9/11), update 2 keeps 3/12 of that
    assert ema.module.weight.item() == pytest.approx(1.0 - (2 / 11) * (3 / 12))
    assert decays == pytest.approx([2 / 11, 3 / 12]) and warmup_decay(0.9, 100) == 0.9
    ema.num_updates = 50  # resuming restores the warm-up's position
    assert ema._updates == 50


def test_ema_warmup_keeps_a_short_runs_ema_near_its_trained_weights(tmp_path):
    """40 steps at decay 0.98 (lag ~49 steps): without warm-up the EMA stays near the start."""
    distances = {}
    for warmup in (False, True):
        task = ToyTask(noise=False)
        start = {k: v.detach().clone() for k, v in task.gen.state_dict().items()}
        trainer = toy_trainer(tmp_path / str(warmup), task=task, steps=40, ema_decay=0.98, ema_warmup=warmup)
        trainer.fit()
        ema, live = trainer.ema_state_dict("gen"), task.gen.state_dict()
        moved = sum((live[k] - start[k]).square().sum() for k in live).sqrt()
        distances[warmup] = float(sum((live[k] - ema[k]).square().sum() for k in live).sqrt() / moved)
    assert distances[False] > 0.4  # the problem: the exported EMA is far from what the run trained
    assert distances[True] < 0.25 * distances[False]


def test_make_adamw_uses_the_fused_kernel_for_plain_cpu_parameters_and_matches_the_loop():
    # Fused AdamW is one kernel per parameter instead of ~10 elementwise passes; same update up to rounding.
    torch.manual_seed(0)
    fused_params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    loop_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    cfg = OptimConfig(lr=1e-2, betas=(0.9, 0.95))
    fused = make_adamw(fused_params, cfg)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(loop_params, lr=1e-2, betas=(0.9, 0.95), eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)
    for _ in range(3):
        for params, optimizer in ((fused_params, fused), (loop_params, loop)):
            for p in params:
                p.grad = torch.ones_like(p) * p.detach().sum()
            optimizer.step()
    for a, b in zip(fused_params, loop_params, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
