"""Tokenizer speed and memory: AlignTok's tokenizer against a VA-VAE-style CNN autoencoder.

    python benchmarks/bench_tokenizer.py                                   # CPU: 256 px, batch 1
    python benchmarks/bench_tokenizer.py --device cuda --sizes 256 512 1024 --batch 8 --precision bf16

Ours: DINOv2-L/14 architecture (random weights, via transformers' ``Dinov2Config``), adapter, f16d32
decoder (:class:`aligntok.models.tokenizer.AlignTokTokenizer`). Anchor: diffusers' ``AutoencoderKL``
with VA-VAE's f16d32 settings (block widths 128-128-256-256-512, 2 layers per block, 32 latent channels).
Random weights are fine: time and memory do not depend on them. ``--tiny`` shrinks both (smoke tests).

Each (model, encode|decode, size) is measured in a fresh subprocess so that peaks do not mix. Memory:
on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before the call (weights and
input); on CPU the peak resident set minus the resident set before the call (the kernel's peak is
reset first through ``/proc/self/clear_refs``). Time: median of ``--repeats`` calls after a warm-up,
under ``torch.no_grad``. Ratios printed are VA-VAE / ours (above 1: ours is faster or smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = ("aligntok", "vavae")


def build(name: str, tiny: bool) -> torch.nn.Module:
    """The tokenizer ``name`` with random weights; both expose ``encode(x)`` and ``decode(z)`` (tensors)."""
    if name == "aligntok":
        from aligntok.models.decoder import DecoderConfig
        from aligntok.models.encoders import RandomEncoderConfig
        from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig

        if tiny:
            encoder = RandomEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, patch_size=14, image_size=56)
            decoder = DecoderConfig(base_channels=8, channel_mult=[1, 1, 2, 2, 4], layers_per_block=1, norm_groups=4)
            return AlignTokTokenizer.from_config(TokenizerConfig(encoder="random", random_encoder=encoder, adapter_hidden=32, decoder=decoder))
        encoder = RandomEncoderConfig(hidden_size=1024, num_layers=24, num_heads=16, patch_size=14, mlp_ratio=4, image_size=518)
        return AlignTokTokenizer.from_config(TokenizerConfig(encoder="random", random_encoder=encoder))
    if name == "vavae":
        from diffusers import AutoencoderKL

        widths, layers = ((8, 8, 16, 16, 32), 1) if tiny else ((128, 128, 256, 256, 512), 2)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=32, block_out_channels=widths, layers_per_block=layers,
            down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5,
            norm_num_groups=4 if tiny else 32,
        )  # fmt: skip
        return _DiffusersAdapter(vae)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


class _DiffusersAdapter(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).latent_dist.mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(name: str, op: str, size: int, batch: int, device: str, precision: str, repeats: int, tiny: bool) -> dict:
    """Seconds (median) and peak activation bytes of one ``op`` of model ``name`` (run in its own process)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build(name, tiny).to(dev).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if op == "encode":
        data = torch.rand(batch, 3, size, size, device=dev) * 2 - 1
    else:
        data = torch.randn(batch, 32, size // 16, size // 16, device=dev)
    fn = getattr(model, op)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def call() -> None:
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=precision == "bf16"):
            fn(data)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    call()  # warm-up (kernel selection, lazy allocations)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        call()
        peak = torch.cuda.max_memory_allocated(dev) - before
    else:
        before = _rss_bytes("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        call()
        peak = max(0, _rss_bytes("VmHWM") - before)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"model": name, "op": op, "size": size, "seconds": statistics.median(times), "peak_bytes": peak, "weight_bytes": weights}


def run_isolated(args: argparse.Namespace, name: str, op: str, size: int) -> dict:
    command = [sys.executable, __file__, "--measure", f"{name}:{op}:{size}", "--batch", str(args.batch), "--device", args.device,
               "--precision", args.precision, "--repeats", str(args.repeats)] + (["--tiny"] if args.tiny else [])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} {op} {size}px failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256], help="image sides in px (multiples of 16)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny widths and depths (smoke tests; numbers mean nothing)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # MODEL:OP:SIZE, the subprocess entry
    return parser


def run(args: argparse.Namespace) -> list[dict]:
    """Measure every model x op x size in its own process; print a table with VA-VAE / ours ratios."""
    rows = []
    print(f"tokenizers, batch {args.batch}, {args.precision}, {args.device}; memory = peak minus weights and input")
    print(f"{'size':>5} {'op':>6} | {'ours s':>8} {'VA-VAE s':>9} {'ratio':>6} | {'ours MB':>8} {'VA-VAE MB':>9} {'ratio':>6}")
    for size in args.sizes:
        for op in ("encode", "decode"):
            ours, anchor = (run_isolated(args, name, op, size) for name in MODELS)
            rows += [ours, anchor]
            time_ratio = anchor["seconds"] / ours["seconds"]
            mem_ratio = anchor["peak_bytes"] / ours["peak_bytes"] if ours["peak_bytes"] else float("nan")
            print(f"{size:>5} {op:>6} | {ours['seconds']:8.3f} {anchor['seconds']:9.3f} {time_ratio:5.2f}x | "
                  f"{ours['peak_bytes'] / 2**20:8.1f} {anchor['peak_bytes'] / 2**20:9.1f} {mem_ratio:5.2f}x")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> list[dict] | None:
    args = build_parser().parse_args(argv)
    if args.measure:
        name, op, size = args.measure.split(":")
        print(json.dumps(measure(name, op, int(size), args.batch, args.device, args.precision, args.repeats, args.tiny)))
        return None
    return run(args)


if __name__ == "__main__":
    main()
