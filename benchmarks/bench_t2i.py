"""Text-to-image training-step speed: the FLUX-architecture wrapper at a preset, with MFU.

    python benchmarks/bench_t2i.py --device cpu --preset FLUX-tiny --batch 32 --tokens 16 --text-tokens 32
    python benchmarks/bench_t2i.py --device cpu --preset FLUX-S --batch 2 --steps 2
    python benchmarks/bench_t2i.py --preset FLUX-2B --batch 64 --bf16 --compile          # one GPU
    torchrun --nproc_per_node=8 benchmarks/bench_t2i.py --preset FLUX-2B --batch 64 --bf16 --fsdp

One step = forward through :class:`aligntok.models.t2i.T2ITransformer` + the transport's loss + backward +
AdamW (text states are random tensors of the encoder's width: the frozen T5 is timed separately by
``--t5-dim 0`` runs). Median over ``--steps`` after warm-up. Model FLOPs per sample (forward x 3):
``2 * 12 d^2 * blocks * L + 4 L^2 d * blocks`` with L = image + text tokens; MFU is against the measured
peak of a large matmul in the same dtype on the same device (``--peak-size``), not a datasheet number.
``--no-mask`` drops the text mask (flash kernels become eligible); ``--attention-backend`` calls diffusers'
``set_attention_backend`` when present; ``--compile`` uses ``compile_repeated_blocks`` when present.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from aligntok.diffusion.transport import Transport, TransportConfig
from aligntok.models.t2i import T2I_PRESETS, T2IConfig, T2ITransformer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Measured FLOP/s of a (size x size) @ (size x size) matmul."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def flops_per_sample(cfg: T2IConfig, image_tokens: int, text_tokens: int) -> float:
    blocks, d, length = cfg.num_layers + cfg.num_single_layers, cfg.width, image_tokens + text_tokens
    return 3 * (2 * 12 * d * d * blocks * length + 4 * length * length * d * blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="FLUX-tiny", choices=list(T2I_PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="per-process batch")
    parser.add_argument("--tokens", type=int, default=256, help="image tokens (a square grid: 256 = 256 px on f16)")
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--channels", type=int, default=32, help="latent channels (AlignTok f16d32)")
    parser.add_argument("--t5-dim", type=int, default=4096)
    parser.add_argument("--pooled-dim", type=int, default=768)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as the engine on GPUs)")
    parser.add_argument("--compile", action="store_true", help="compile_repeated_blocks(fullgraph=True)")
    parser.add_argument("--no-mask", action="store_true", help="no text mask")
    parser.add_argument("--attention-backend", help="diffusers attention backend, e.g. flash, native")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 over the ranks of torchrun (the engine's sharding)")
    parser.add_argument("--peak-size", type=int, default=8192, help="matmul side for the measured peak (CPU: use 1024)")
    args = parser.parse_args()

    rank = int(os.environ.get("RANK", "0"))
    if args.fsdp:
        from aligntok.training.distributed import init_distributed

        device = init_distributed().device
    else:
        device = torch.device(args.device)
    side = round(args.tokens**0.5)
    cfg = T2IConfig.from_preset(args.preset, in_channels=args.channels, text_dim=args.t5_dim, pooled_dim=args.pooled_dim,
                                mask_padding=not args.no_mask, gradient_checkpointing=args.checkpointing)
    torch.manual_seed(0)
    model = T2ITransformer(cfg).to(device)
    params = sum(p.numel() for p in model.parameters())
    if args.fsdp:
        from aligntok.training.distributed import fsdp_shard

        fsdp_shard(model)
    if args.attention_backend and hasattr(model.transformer, "set_attention_backend"):
        model.transformer.set_attention_backend(args.attention_backend)
    if args.compile and hasattr(model.transformer, "compile_repeated_blocks"):
        model.transformer.compile_repeated_blocks(fullgraph=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    transport = Transport(TransportConfig(cosine_weight=0.0))
    z = torch.randn(args.batch, args.channels, side, side, device=device)
    text = torch.randn(args.batch, args.text_tokens, args.t5_dim, device=device)
    mask = torch.ones(args.batch, args.text_tokens, dtype=torch.bool, device=device)
    mask[:, args.text_tokens // 2 :] = False  # half padding, as short captions
    pooled = torch.randn(args.batch, args.pooled_dim, device=device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss, _ = transport.loss(model, z, {"text": text, "text_mask": mask, "pooled": pooled})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = matmul_peak(device, dtype, args.peak_size)
    achieved = flops_per_sample(cfg, side * side, args.text_tokens) * args.batch / seconds
    result = {
        "preset": args.preset, "params": params, "device": str(device), "dtype": str(dtype), "batch": args.batch,
        "image_tokens": side * side, "text_tokens": args.text_tokens, "step_s": round(seconds, 4),
        "samples_per_s": round(args.batch / seconds, 2), "achieved_tflops": round(achieved / 1e12, 3),
        "matmul_peak_tflops": round(peak / 1e12, 3), "mfu": round(achieved / peak, 4),
        "compile": args.compile, "mask": not args.no_mask, "fsdp": args.fsdp,
        "max_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    if rank == 0:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
