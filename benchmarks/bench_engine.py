"""Per-step overhead of the training engine against a bare PyTorch loop (not a test).

Both loops train the same small MLP with AdamW on the same pre-made batches for the same number of
steps, in one process. The engine is timed twice: lean (no EMA, no clipping, one log record) and with
the features a real run uses (EMA, clipping, a log record every 10 steps). Its per-step time comes from
its own ``step_time`` log field (data fetch + step, no setup and no final checkpoint); the whole
``fit()`` wall time, which adds both, is printed too.

    python benchmarks/bench_engine.py [--steps 300] [--batch 64] [--width 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from aligntok.config import OptimConfig, TrainConfig
from aligntok.training.distributed import DistInfo
from aligntok.training.trainer import Trainer


def make_model(width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 64)
    )


class RegressionTask:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizers(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.model.parameters())}

    def ema_modules(self) -> list[str]:
        return ["model"]

    def losses(self, batch: dict, step: int):
        loss = nn.functional.mse_loss(self.model(batch["x"]), batch["y"])
        return {"model": (loss, {})}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(batches: list[dict], width: int, device: torch.device, warmup: int) -> float:
    """Seconds per step of the plainest loop: forward, backward, AdamW step."""
    model = make_model(width).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch: dict) -> None:
        loss = nn.functional.mse_loss(model(batch["x"].to(device)), batch["y"].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for batch in batches[:warmup]:
        step(batch)
    sync(device)
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    sync(device)
    return (time.perf_counter() - started) / len(batches)


def engine_loop(
    batches: list[dict], width: int, device: torch.device, out_dir: Path, *, features: bool
) -> tuple[float, float]:
    """(seconds per step from the engine's own log, wall seconds of the whole fit())."""
    steps = len(batches)
    train = TrainConfig(
        steps=steps,
        batch_size=batches[0]["x"].shape[0],
        precision="fp32",
        ema_decay=0.999 if features else 0.0,
        log_every=10 if features else steps,
        ckpt_every=steps,
    )
    optim = {"model": OptimConfig(lr=1e-3, grad_clip=1.0 if features else 0.0)}

    def loader_factory(start_step: int):
        return iter(batches[start_step:])

    trainer = Trainer(
        RegressionTask(make_model(width)),
        train=train,
        optim=optim,
        loader_factory=loader_factory,
        out_dir=out_dir,
        dist=DistInfo(device=device),
    )
    started = time.perf_counter()
    trainer.fit()
    sync(device)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    # Weighted mean over records: each record's step_time averages the steps since the previous one.
    total, previous = 0.0, 0
    for record in records:
        total += record["step_time"] * (record["step"] - previous)
        previous = record["step"]
    return total / previous, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    batches = [
        {
            "x": torch.randn(args.batch, 64, generator=generator),
            "y": torch.randn(args.batch, 64, generator=generator),
        }
        for _ in range(args.steps)
    ]
    print(
        f"device={device} threads={torch.get_num_threads()} steps={args.steps} "
        f"batch={args.batch} width={args.width}"
    )
    bare = bare_loop(batches, args.width, device, args.warmup)
    print(f"bare PyTorch loop           : {bare * 1e3:8.3f} ms/step")
    with tempfile.TemporaryDirectory() as tmp:
        for features in (False, True):
            label = "engine (EMA, clip, log/10)" if features else "engine (lean)"
            per_step, wall = engine_loop(
                batches, args.width, device, Path(tmp) / label.split()[1], features=features
            )
            print(
                f"{label:28s}: {per_step * 1e3:8.3f} ms/step  ratio {per_step / bare:5.2f}x  "
                f"(+{(per_step - bare) * 1e3:.3f} ms/step; whole fit() incl. setup+checkpoint {wall:.2f} s)"
            )


if __name__ == "__main__":
    main()
