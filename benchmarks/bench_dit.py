"""LightningDiT speed: our training step against the reference implementation's, and sampling throughput.

    python benchmarks/bench_dit.py --reference-repo /path/to/hustvl/LightningDiT   # GPU: bf16 autocast
    python benchmarks/bench_dit.py --device cpu --preset LightningDiT-S/2 --steps 3 --sample-steps 5

The anchor is the reference's own ``models/lightningdit.py`` (needs ``timm`` and ``einops``), imported
from a checkout given by ``--reference-repo``; it is never vendored here. Both models get the same
config, the same weights and the same inputs; one training step is forward + our transport loss +
backward + AdamW, timed as the median over ``--steps`` after warm-up. The ratio printed is
reference time / our time (above 1 means we are faster). Sampling throughput is images per second for
``--sample-steps`` Euler steps with classifier-free guidance on every step.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Callable

import torch

from aligntok.diffusion import SamplerConfig, Transport, sample
from aligntok.models.lightningdit import LIGHTNINGDIT_PRESETS, LightningDiT, LightningDiTConfig


def load_reference(repo: str, config: LightningDiTConfig) -> torch.nn.Module:
    """The reference LightningDiT built with ``config`` (imported from a checkout, not copied)."""
    sys.path.insert(0, repo)
    module = importlib.import_module("models.lightningdit")
    return module.LightningDiT(
        input_size=config.input_size, patch_size=config.patch_size, in_channels=config.in_channels,
        hidden_size=config.hidden_size, depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
        class_dropout_prob=config.class_dropout_prob, num_classes=config.num_classes, learn_sigma=config.learn_sigma,
        use_qknorm=config.use_qknorm, use_swiglu=config.use_swiglu, use_rope=config.use_rope,
        use_rmsnorm=config.use_rmsnorm, wo_shift=config.wo_shift,
    )  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_fn(model: torch.nn.Module, batch: int, config: LightningDiTConfig, device: torch.device, dtype: torch.dtype | None):
    transport = Transport()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, betas=(0.9, 0.95))
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(batch, config.in_channels, config.input_size, config.input_size, device=device, generator=gen)
    labels = torch.randint(0, config.num_classes, (batch,), device=device, generator=gen)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = transport.loss(model, latents, {"y": labels}, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="LightningDiT-B/1", choices=sorted(LIGHTNINGDIT_PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (the reference compiles its own methods)")
    parser.add_argument("--reference-repo", help="checkout of hustvl/LightningDiT to time the reference against")
    parser.add_argument("--sample-steps", type=int, default=250)
    parser.add_argument("--sample-batch", type=int, default=16)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    config = LightningDiTConfig.from_preset(args.preset, input_size=args.latent_size, in_channels=args.channels)
    torch.manual_seed(0)
    ours = LightningDiT(config).to(device).train()
    print(f"{args.preset}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params, batch {args.batch}, "
          f"{args.channels}x{args.latent_size}x{args.latent_size} latents, {args.precision}, {device}")  # fmt: skip

    runnable = torch.compile(ours) if args.compile else ours
    ours_time = median_time(train_step_fn(runnable, args.batch, config, device, dtype), args.steps, args.warmup, device)
    print(f"ours      train step: {ours_time * 1e3:8.2f} ms")
    if args.reference_repo:
        reference = load_reference(args.reference_repo, config).to(device).train()
        reference.load_state_dict(ours.state_dict(), strict=True)  # same weights, checked key for key
        ref_time = median_time(train_step_fn(reference, args.batch, config, device, dtype), args.steps, args.warmup, device)
        print(f"reference train step: {ref_time * 1e3:8.2f} ms")
        print(f"speed-up (reference / ours): {ref_time / ours_time:.2f}x")

    ours.eval()
    sampler = SamplerConfig(num_steps=args.sample_steps, cfg_scale=4.0, cfg_interval_start=0.0)
    labels = torch.arange(args.sample_batch, device=device) % config.num_classes

    def run_sampler() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            sample(runnable, labels, sampler, latent_shape=(config.in_channels, config.input_size, config.input_size),
                   null_label=ours.null_label, generator=torch.Generator(device=device).manual_seed(0))  # fmt: skip

    seconds = median_time(run_sampler, steps=1, warmup=1, device=device)
    print(f"sampling: {args.sample_batch / seconds:.2f} images/s ({args.sample_steps} Euler steps, CFG on every step)")


if __name__ == "__main__":
    main()
