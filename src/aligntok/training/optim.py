"""The optimizer and learning-rate schedule every aligntok training run uses: AdamW (fused where torch has the
kernel) and a per-step multiplier of the peak lr (linear warm-up, then constant, cosine or linear decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from aligntok.config import OptimConfig

__all__ = ["lr_factor", "make_adamw"]


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr for the ``step``-th optimizer step (0-based).

    Linear warm-up reaching the peak at the end of ``warmup_steps``, then constant, cosine or linear
    decay to ``min_lr_ratio`` at ``total_steps``.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        decay = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def make_adamw(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW of ``cfg``; the fused kernel (one pass per parameter instead of ~10) where torch has one
    for every parameter's device (CPU, CUDA) and the parameters are plain tensors (not FSDP's DTensors)."""
    from torch.distributed.tensor import DTensor

    fusable = bool(params) and all(p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fusable or None
    )
