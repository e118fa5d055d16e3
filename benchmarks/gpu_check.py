"""One table of the GPU numbers that matter, ready before a GPU arrives (run through gpu_check.sh).

Rows, in this order (cheapest and most important first; each row is printed as soon as it is measured,
so a run cut short keeps what it finished, and a row that fails prints its one-line error instead):
the bf16 matmul peak measured here (the MFU denominator); LightningDiT-XL/1 bf16 training throughput
(images/s) and MFU (model FLOPs per step counted with ``torch.utils.flop_counter`` on one real step:
matmuls and attention, forward and backward, against that peak); the tokenizers' encode / decode time
and peak memory at 1024 px batch 8, ours against the VA-VAE f16d32 AutoencoderKL (bench_tokenizer, one
process each); sampling images/s with 250 and 30 Euler steps, guidance on [0.1, 1]; the text-to-image
transformer's training step (bench_t2i: FLUX-2B, 256 image + 128 text tokens); with ``--reference-repo``,
our training step and sampler against the reference LightningDiT's, alternating in one process
(bench_dit), eager and compiled. ``--smoke`` runs everything at toy sizes on whatever device is present
(CPU in CI): numbers mean nothing there, the point is that every row runs. Budget on one H200: < 8 min.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from aligntok.config import OptimConfig
from aligntok.diffusion import SamplerConfig
from aligntok.models.lightningdit import LightningDiT, LightningDiTConfig
from aligntok.training.optim import make_adamw

HERE = Path(__file__).resolve().parent


@functools.cache  # one module object per benchmark file, however many rows use it
def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Table:
    """Rows printed as they come (``| check | value |``) and once more, together, at the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []

    def add(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"| {name} | {value} |", flush=True)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Run one group of rows; a failure becomes the row ``name | FAILED: ...`` and the next group runs."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - one broken row must not cost the others on a leased GPU
            message = (str(error).strip().splitlines() or [""])[-1]
            self.add(name, f"FAILED: {type(error).__name__}: {message[:300]}")

    def print(self) -> None:
        width = max(len(name) for name, _ in self.rows)
        print("\n| " + "check".ljust(width) + " | value |")
        print("|" + "-" * (width + 2) + "|-------|")
        for name, value in self.rows:
            print(f"| {name.ljust(width)} | {value} |")
        sys.stdout.flush()


def matmul_peak_flops(device: torch.device, size: int, repeats: int) -> float:
    """Measured bf16 matmul FLOP/s (best of ``repeats`` rounds of 10) on square ``size`` random matrices."""
    bench_dit = _bench_module("bench_dit")
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)

    def ten() -> None:
        for _ in range(10):
            a @ b

    ten()
    return 2 * size**3 / min(bench_dit.timed(ten, device) / 10 for _ in range(repeats))


def dit_training(config: LightningDiTConfig, batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(median seconds per step, model FLOPs per step) of bench_dit's bf16 step: forward, loss, backward, AdamW."""
    bench_dit = _bench_module("bench_dit")
    torch.manual_seed(0)
    model = LightningDiT(config).to(device).train()
    optimizer = make_adamw(list(model.parameters()), OptimConfig(lr=2e-4, betas=(0.9, 0.95)))
    step = bench_dit.train_step_fn(model, optimizer, batch, config, device, torch.bfloat16)
    with FlopCounterMode(display=False) as counter:
        step()  # also the first warm-up step
    seconds = bench_dit.alternate({"ours": step}, steps, warmup=2, device=device)["ours"]
    return seconds, float(counter.get_total_flops())


def dit_sampling(config: LightningDiTConfig, batch: int, num_steps: int, device: torch.device) -> float:
    """Images/s of our sampler (Euler, guidance 4 on t >= 0.1, bf16); warmed up with a 2-step run."""
    bench_dit = _bench_module("bench_dit")
    torch.manual_seed(0)
    model = LightningDiT(config).to(device).eval()
    labels = torch.arange(batch, device=device) % config.num_classes
    bench_dit.our_sample_fn(model, labels, SamplerConfig(num_steps=2, cfg_scale=4.0), torch.bfloat16)()
    run = bench_dit.our_sample_fn(model, labels, SamplerConfig(num_steps=num_steps, cfg_scale=4.0, cfg_interval_start=0.1), torch.bfloat16)
    return batch / bench_dit.timed(run, device)


def t2i_step(args: list[str]) -> dict:
    """bench_t2i's JSON result, run in its own process (its peak memory must not mix with ours)."""
    done = subprocess.run([sys.executable, str(HERE / "bench_t2i.py"), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["bench_t2i failed"])[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any device (CI); numbers mean nothing")
    parser.add_argument("--reference-repo", help="checkout of hustvl/LightningDiT: time ours against it (bench_dit)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        preset, overrides, batch, steps, sample_batch, sample_steps = "LightningDiT-S/2", {"depth": 1, "input_size": 4}, 2, 1, 2, (2, 1)
        matmul, tok = 128, {"sizes": [32], "batch": 1, "tiny": True, "precision": "fp32"}
        t2i = ["--preset", "FLUX-tiny", "--batch", "2", "--tokens", "4", "--text-tokens", "4", "--t5-dim", "8", "--pooled-dim", "8",
               "--steps", "1", "--warmup", "0", "--peak-size", "64"]  # fmt: skip
        versus = ["--preset", "LightningDiT-S/2", "--depth", "1", "--latent-size", "4", "--batch", "2", "--repeats", "1",
                  "--warmup", "0", "--sample-steps", "2", "--sample-batch", "2"]  # fmt: skip
    else:
        preset, overrides, batch, steps, sample_batch, sample_steps = "LightningDiT-XL/1", {}, 64, 10, 64, (250, 30)
        matmul, tok = 8192, {"sizes": [1024], "batch": 8, "tiny": False, "precision": "bf16"}
        t2i = ["--preset", "FLUX-2B", "--batch", "32", "--tokens", "256", "--text-tokens", "128", "--bf16", "--steps", "5", "--warmup", "2"]
        versus = ["--preset", "LightningDiT-XL/1", "--batch", "64", "--repeats", "5", "--warmup", "2", "--compile",
                  "--sample-steps", "30", "--sample-batch", "64", "--sample-repeats", "1"]  # fmt: skip
    config = LightningDiTConfig.from_preset(preset, in_channels=32, **{"input_size": 16, **overrides})
    table = Table()
    table.add("device", f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")

    peak = float("nan")
    with table.section("bf16 matmul peak"):
        peak = matmul_peak_flops(device, matmul, repeats=5)
        table.add(f"bf16 matmul peak ({matmul}^3, random)", f"{peak / 1e12:.1f} TFLOP/s")
    with table.section(f"{preset} train"):
        seconds, flops = dit_training(config, batch, steps, device)
        table.add(f"{preset} train, batch {batch}, bf16, eager", f"{batch / seconds:.1f} images/s ({seconds * 1e3:.1f} ms/step)")
        table.add(f"{preset} MFU ({flops / 1e12:.2f} TFLOP/step counted)", f"{100 * flops / seconds / peak:.1f}%")
        if device.type == "cuda":
            table.add(f"{preset} train peak memory", f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")

    bench_tokenizer = _bench_module("bench_tokenizer")
    tok_args = bench_tokenizer.build_parser().parse_args(["--device", device.type, "--repeats", "2"])
    for key, value in tok.items():
        setattr(tok_args, key, value)
    for size in tok["sizes"]:
        for op in ("encode", "decode"):
            with table.section(f"tokenizer {op} {size}px"):
                if args.smoke:  # in this process: a subprocess per row costs more than the toy models
                    ours, anchor = (bench_tokenizer.measure(name, op, size, 1, device.type, "fp32", 1, tiny=True) for name in bench_tokenizer.MODELS)
                else:
                    ours, anchor = (bench_tokenizer.run_isolated(tok_args, name, op, size) for name in bench_tokenizer.MODELS)
                table.add(f"tokenizer {op} {size}px batch {tok['batch']}: ours / VA-VAE time",
                          f"{ours['seconds'] * 1e3:.0f} / {anchor['seconds'] * 1e3:.0f} ms ({anchor['seconds'] / ours['seconds']:.2f}x)")  # fmt: skip
                ratio = anchor["peak_bytes"] / ours["peak_bytes"] if ours["peak_bytes"] else float("nan")
                table.add(f"tokenizer {op} {size}px batch {tok['batch']}: ours / VA-VAE memory",
                          f"{ours['peak_bytes'] / 2**30:.2f} / {anchor['peak_bytes'] / 2**30:.2f} GiB ({ratio:.1f}x smaller)")  # fmt: skip

    for num_steps in sample_steps:
        with table.section(f"{preset} sampling, {num_steps} steps"):
            rate = dit_sampling(config, sample_batch, num_steps, device)
            table.add(f"{preset} sampling, {num_steps} Euler steps, guidance on t >= 0.1, batch {sample_batch}", f"{rate:.2f} images/s")

    with table.section("text-to-image transformer step"):
        result = t2i_step([*t2i, "--device", device.type])
        table.add(f"T2I {result['preset']} ({result['params'] / 1e9:.2f}B) train, batch {result['batch']}, {result['image_tokens']}+{result['text_tokens']} tokens",
                  f"{result['samples_per_s']} samples/s ({result['step_s'] * 1e3:.0f} ms/step), MFU {100 * result['mfu']:.1f}%"
                  + (f", {result['max_memory_gb']} GiB" if result["max_memory_gb"] is not None else ""))  # fmt: skip

    if args.reference_repo:
        with table.section("ours vs reference (bench_dit)"):
            results = _bench_module("bench_dit").main([*versus, "--device", device.type, "--reference-repo", args.reference_repo])
            for key, value in results.items():
                table.add(f"vs reference: {key}", f"{value:.4g}")
    table.print()
    return table.rows


if __name__ == "__main__":
    main()
