"""One table of the GPU numbers that matter, ready before a GPU arrives (run through gpu_check.sh).

Rows: the bf16 matmul peak measured here (the MFU denominator); LightningDiT-XL/1 bf16 training
throughput (images/s) and MFU (model FLOPs per step counted with ``torch.utils.flop_counter`` on one
real step: matmuls and attention, forward and backward, against that peak); sampling images/s with 250
and 30 Euler steps, guidance on [0.1, 1]; the tokenizers' encode / decode time and peak memory at
1024 px batch 8, ours against the VA-VAE f16d32 AutoencoderKL (via bench_tokenizer, one process each).
``--smoke`` runs everything at toy sizes on whatever device is present (CPU in CI): numbers mean
nothing there, the point is that every row runs. Budget on one H200: well under 8 minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from aligntok.config import OptimConfig
from aligntok.diffusion import SamplerConfig, Transport, sample
from aligntok.models.lightningdit import LightningDiT, LightningDiTConfig
from aligntok.training.trainer import make_adamw

HERE = Path(__file__).resolve().parent


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, size: int, repeats: int) -> float:
    """Measured bf16 matmul FLOP/s (best of ``repeats``) on square ``size`` matrices."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * size**3 / best


def dit_training(config: LightningDiTConfig, batch: int, steps: int, device: torch.device, compile_model: bool) -> tuple[float, float]:
    """(seconds per step, model FLOPs per step) of bf16 training: forward, loss, backward, AdamW."""
    torch.manual_seed(0)
    model = LightningDiT(config).to(device).train()
    if compile_model:
        model.compile()
    optimizer = make_adamw(list(model.parameters()), OptimConfig(lr=2e-4, betas=(0.9, 0.95)))
    transport = Transport()
    latents = torch.randn(batch, config.in_channels, config.input_size, config.input_size, device=device)
    labels = torch.randint(0, config.num_classes, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = transport.loss(model, latents, {"y": labels})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps, float(counter.get_total_flops())


def dit_sampling(config: LightningDiTConfig, batch: int, num_steps: int, device: torch.device) -> float:
    """Images/s of our sampler (Euler, guidance 4 on t >= 0.1, bf16)."""
    torch.manual_seed(0)
    model = LightningDiT(config).to(device).eval()
    labels = torch.arange(batch, device=device) % config.num_classes
    sampler = SamplerConfig(num_steps=num_steps, cfg_scale=4.0, cfg_interval_start=0.1)

    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            sample(model, labels, sampler)

    run()
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any device (CI); numbers mean nothing")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT for the training row")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        preset, overrides, batch, steps, sample_batch, sample_steps = "LightningDiT-S/2", {"depth": 1, "input_size": 4}, 2, 1, 2, (2, 1)
        matmul, tok = 128, {"sizes": [32], "batch": 1, "tiny": True, "precision": "fp32"}
    else:
        preset, overrides, batch, steps, sample_batch, sample_steps = "LightningDiT-XL/1", {}, 64, 10, 64, (250, 30)
        matmul, tok = 8192, {"sizes": [1024], "batch": 8, "tiny": False, "precision": "bf16"}
    config = LightningDiTConfig.from_preset(preset, in_channels=32, **{"input_size": 16, **overrides})
    rows: list[tuple[str, str]] = [("device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu")]

    peak = matmul_peak_flops(device, matmul, repeats=5)
    rows.append((f"bf16 matmul peak ({matmul}^3)", f"{peak / 1e12:.1f} TFLOP/s"))
    seconds, flops = dit_training(config, batch, steps, device, args.compile)
    rows.append((f"{preset} train, batch {batch}, bf16{' compiled' if args.compile else ''}", f"{batch / seconds:.1f} images/s ({seconds * 1e3:.1f} ms/step)"))
    rows.append((f"{preset} MFU ({flops / 1e12:.2f} TFLOP/step counted)", f"{100 * flops / seconds / peak:.1f}%"))
    for num_steps in sample_steps:
        rows.append((f"{preset} sampling, {num_steps} Euler steps, batch {sample_batch}", f"{dit_sampling(config, sample_batch, num_steps, device):.2f} images/s"))

    bench_tokenizer = _bench_module("bench_tokenizer")
    tok_args = bench_tokenizer.build_parser().parse_args(["--device", device.type, "--repeats", "2"])
    for key, value in tok.items():
        setattr(tok_args, key, value)
    for size in tok["sizes"]:
        for op in ("encode", "decode"):
            if args.smoke:  # in this process: a subprocess per row costs more than the toy models
                ours, anchor = (bench_tokenizer.measure(name, op, size, 1, device.type, "fp32", 1, tiny=True) for name in bench_tokenizer.MODELS)
            else:
                ours, anchor = (bench_tokenizer.run_isolated(tok_args, name, op, size) for name in bench_tokenizer.MODELS)
            rows.append((f"tokenizer {op} {size}px batch {tok['batch']}: ours / VA-VAE time",
                         f"{ours['seconds'] * 1e3:.0f} / {anchor['seconds'] * 1e3:.0f} ms ({anchor['seconds'] / ours['seconds']:.2f}x)"))  # fmt: skip
            rows.append((f"tokenizer {op} {size}px batch {tok['batch']}: ours / VA-VAE memory",
                         f"{ours['peak_bytes'] / 2**30:.2f} / {anchor['peak_bytes'] / 2**30:.2f} GiB"))  # fmt: skip
    rows.append(("text-to-image transformer step", "not measured (no T2I model in this tree yet)"))

    width = max(len(name) for name, _ in rows)
    print("| " + "check".ljust(width) + " | value |")
    print("|" + "-" * (width + 2) + "|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    sys.stdout.flush()
    return rows


if __name__ == "__main__":
    main()
