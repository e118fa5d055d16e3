"""LightningDiT speed: our training step and sampler against the reference implementation's, side by side.

    python benchmarks/bench_dit.py --reference-repo /path/to/hustvl/LightningDiT            # CPU: B/1, batch 8, bf16
    python benchmarks/bench_dit.py --reference-repo ... --device cuda --preset LightningDiT-XL/1 --batch 64

The anchor is the reference's own ``models/lightningdit.py`` (needs ``timm`` and ``einops``; the
fairscale import its ``models/rmsnorm.py`` never uses is stubbed), imported from a checkout given by
``--reference-repo``; it is never vendored here. It runs as shipped, i.e. with its ``@torch.compile``
decorators (set ``TORCHDYNAMO_DISABLE=1`` to time it eager). Both models get the same config, weights
and inputs. One training step is forward + our transport loss + backward + AdamW: ours with the
optimizer our trainer builds (:func:`aligntok.training.optim.make_adamw`, fused where supported), the
reference with the plain ``torch.optim.AdamW`` of its ``train.py``. Steps alternate ours / reference in
one process (the machine may be shared), ``--repeats`` rounds; medians and the ratio reference / ours
(above 1: we are faster) are printed. ``--compile`` adds a copy of ours with its blocks compiled
(``compile_repeated_blocks``, as ``train.compile`` and ``sample --compile``) to the training and sampling
rotations (the reference compiles its blocks itself, so this is like for like).

``--profile`` runs each training step once more under ``torch.profiler`` and prints the share of its time
spent in the kernels both models call with the same shapes (matmuls and SDPA, forward and backward: the
ATen ops in ``SHARED_KERNELS``). With a reference, the reference's step over its own time in those kernels
is the ceiling of any like-for-like rewrite (Amdahl's law: a model that did nothing else).

Sampling: images/s for ``--sample-steps`` Euler steps with guidance on the interval [``--cfg-interval-start``,
1]. Ours is :func:`aligntok.diffusion.sample` (one model call of batch B outside the interval); the
reference's loop calls its ``forward_with_cfg`` on the doubled batch at every step, as its sampler does.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import statistics
import sys
import time
import types
from collections.abc import Callable

import torch

from aligntok.config import OptimConfig
from aligntok.diffusion import SamplerConfig, Transport, sample
from aligntok.diffusion.samplers import timestep_grid
from aligntok.models.lightningdit import (
    LIGHTNINGDIT_PRESETS,
    LightningDiT,
    LightningDiTConfig,
)
from aligntok.training.optim import make_adamw


def _stub_fairscale() -> None:
    # The reference's models/rmsnorm.py imports fairscale's model-parallel layers it never uses; empty
    # stand-in modules let it import without installing fairscale.
    try:
        importlib.import_module("fairscale")
        return
    except ImportError:
        pass
    names = ("fairscale", "fairscale.nn", "fairscale.nn.model_parallel", "fairscale.nn.model_parallel.initialize",
             "fairscale.nn.model_parallel.layers")  # fmt: skip
    for name in names:
        module = types.ModuleType(name)
        if name.endswith(".layers"):
            module.ColumnParallelLinear = module.ParallelEmbedding = module.RowParallelLinear = None
        sys.modules[name] = module


def load_reference(repo: str, config: LightningDiTConfig) -> torch.nn.Module:
    """The reference LightningDiT built with ``config`` (imported from a checkout, not copied)."""
    if repo not in sys.path:
        sys.path.insert(0, repo)
    _stub_fairscale()
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


def timed(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each fn, run in turn (a, b, a, b, ...) so that load on a shared machine hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


SHARED_KERNELS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::_flash_attention_forward", "aten::_flash_attention_backward",
    "aten::_efficient_attention_forward", "aten::_efficient_attention_backward",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_cudnn_attention_backward",
})  # fmt: skip


def shared_kernel_share(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(seconds of one ``fn()`` call, the fraction of it in :data:`SHARED_KERNELS`), from ``torch.profiler``.

    Self time of those ops (device time on CUDA, CPU time otherwise) over the profiled wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = timed(fn, device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    shared_us = sum(getattr(e, attr) for e in prof.key_averages() if e.key in SHARED_KERNELS)
    return seconds, shared_us / 1e6 / seconds


def train_step_fn(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: int, config: LightningDiTConfig,
                  device: torch.device, dtype: torch.dtype | None) -> Callable[[], None]:  # fmt: skip
    """One training step (forward, loss, backward, optimizer) on fixed random latents and labels."""
    transport = Transport()
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(batch, config.in_channels, config.input_size, config.input_size, device=device, generator=gen)
    labels = torch.randint(0, config.num_classes, (batch,), device=device, generator=gen)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = transport.loss(model, latents, {"y": labels}, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def reference_sample_fn(reference: torch.nn.Module, labels: torch.Tensor, sampler: SamplerConfig, config: LightningDiTConfig,
                        null_label: int, dtype: torch.dtype | None) -> Callable[[], None]:  # fmt: skip
    """The reference's sampling loop: Euler on the same grid, ``forward_with_cfg`` on (x, x) at every step."""
    device = labels.device
    shape = (labels.shape[0], config.in_channels, config.input_size, config.input_size)
    y = torch.cat([labels, torch.full_like(labels, null_label)])

    def run() -> None:
        x = torch.randn(shape, device=device, generator=torch.Generator(device=device).manual_seed(0))
        grid = timestep_grid(sampler.num_steps, sampler.timestep_shift)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for t, t_next in itertools.pairwise(grid):
                both = torch.cat([x, x])
                t_batch = torch.full((both.shape[0],), t, device=device)
                out = reference.forward_with_cfg(both, t_batch, y, sampler.cfg_scale, cfg_interval=True,
                                                 cfg_interval_start=sampler.cfg_interval_start)  # fmt: skip
                x = x + (t_next - t) * out[: shape[0]].float()

    return run


def our_sample_fn(model: LightningDiT, labels: torch.Tensor, sampler: SamplerConfig, dtype: torch.dtype | None) -> Callable[[], None]:
    device = labels.device

    def run() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            sample(model, labels, sampler, generator=torch.Generator(device=device).manual_seed(0))

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="LightningDiT-B/1", choices=sorted(LIGHTNINGDIT_PRESETS))
    parser.add_argument("--depth", type=int, help="override the preset's depth (tiny smoke runs)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps per model, alternating")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--compile", action="store_true", help="also time a copy of ours with its blocks compiled (compile_repeated_blocks)")
    parser.add_argument("--reference-repo", help="checkout of hustvl/LightningDiT to time the reference against")
    parser.add_argument("--profile", action="store_true",
                        help="print each step's share in the matmul / SDPA kernels both models share, and the ceiling it sets")
    parser.add_argument("--sample-steps", type=int, default=30, help="Euler steps; 0 skips the sampling benchmark")
    parser.add_argument("--sample-batch", type=int, default=4)
    parser.add_argument("--sample-repeats", type=int, default=1)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--cfg-interval-start", type=float, default=0.10)
    return parser


def run(args: argparse.Namespace) -> dict[str, float]:
    """Run the benchmark; returns the medians (s), images/s and ratios it printed."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    overrides = {"input_size": args.latent_size, "in_channels": args.channels}
    if args.depth:
        overrides["depth"] = args.depth
    config = LightningDiTConfig.from_preset(args.preset, **overrides)
    torch.manual_seed(0)
    ours = LightningDiT(config).to(device).train()
    print(f"{args.preset}{f' (depth {args.depth})' if args.depth else ''}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M "
          f"params, batch {args.batch}, {args.channels}x{args.latent_size}x{args.latent_size} latents, {args.precision}, {device}")  # fmt: skip
    reference = None
    if args.reference_repo:
        reference = load_reference(args.reference_repo, config).to(device).train()
        reference.load_state_dict(ours.state_dict(), strict=True)  # same weights, checked key for key
    models = {"ours": ours}
    if args.compile:
        compiled = LightningDiT(config).to(device).train()
        compiled.load_state_dict(ours.state_dict())
        compiled.compile_repeated_blocks()  # what train.compile and `sample --compile` do
        models["ours-compiled"] = compiled

    results: dict[str, float] = {}
    optim = OptimConfig(lr=2e-4, betas=(0.9, 0.95))
    steps = {name: train_step_fn(model, make_adamw(list(model.parameters()), optim), args.batch, config, device, dtype)
             for name, model in models.items()}  # fmt: skip
    if reference is not None:
        ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=2e-4, weight_decay=0, betas=(0.9, 0.95))
        steps["reference"] = train_step_fn(reference, ref_optimizer, args.batch, config, device, dtype)
    medians = alternate(steps, args.repeats, args.warmup, device)
    for name, seconds in medians.items():
        results[f"train_step_s_{name}"] = seconds
        print(f"{name:>13} train step: {seconds * 1e3:9.1f} ms (median of {args.repeats})")
    if reference is not None:
        for name in models:
            suffix = "" if name == "ours" else "_compiled"
            results[f"train_speedup{suffix}"] = medians["reference"] / medians[name]
            print(f"train step speed-up (reference / {name}): {results[f'train_speedup{suffix}']:.2f}x")
    if args.profile:
        for name, fn in steps.items():
            seconds, share = shared_kernel_share(fn, device)
            results[f"shared_kernel_share_{name}"] = share
            print(f"{name:>13} profiled step: {seconds * 1e3:9.1f} ms, of which {share * seconds * 1e3:.1f} ms "
                  f"({share:.1%}) in matmul / SDPA kernels")
        if reference is not None:
            ceiling = 1 / max(results["shared_kernel_share_reference"], 1e-9)
            print(f"ceiling: a model calling the reference's matmul / SDPA kernels and nothing else would be "
                  f"{ceiling:.2f}x the reference")

    if args.sample_steps > 0:
        ours.eval()
        sampler = SamplerConfig(num_steps=args.sample_steps, cfg_scale=args.cfg_scale, cfg_interval_start=args.cfg_interval_start)
        labels = torch.arange(args.sample_batch, device=device) % config.num_classes
        runs = {"ours": our_sample_fn(ours, labels, sampler, dtype)}
        if args.compile:
            runs["ours-compiled"] = our_sample_fn(models["ours-compiled"].eval(), labels, sampler, dtype)
        if reference is not None:
            reference.eval()
            runs["reference"] = reference_sample_fn(reference, labels, sampler, config, ours.null_label, dtype)
        medians = alternate(runs, args.sample_repeats, warmup=1, device=device)
        for name, seconds in medians.items():
            results[f"sample_images_per_s_{name}"] = args.sample_batch / seconds
            print(f"{name:>13} sampling: {args.sample_batch / seconds:8.2f} images/s "
                  f"({args.sample_steps} Euler steps, guidance for t >= {args.cfg_interval_start})")  # fmt: skip
        if reference is not None:
            for name in [name for name in runs if name != "reference"]:
                suffix = "" if name == "ours" else "_compiled"
                results[f"sample_speedup{suffix}"] = medians["reference"] / medians[name]
                print(f"sampling speed-up (reference / {name}): {results[f'sample_speedup{suffix}']:.2f}x")
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
