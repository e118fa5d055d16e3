"""Exponential moving average of a module's weights, kept in fp32.

Built on :class:`torch.optim.swa_utils.AveragedModel` with ``get_ema_multi_avg_fn`` (one fused
``_foreach_lerp_`` per dtype group). The first update copies the weights; later ones blend them in with
weight ``1 - decay``. Buffers are not averaged but copied from the live module, as is usual for EMA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def _fp32_ema_update(decay: float):
    """EMA update that accepts a low-precision live model (its weights are upcast before blending)."""
    blend = get_ema_multi_avg_fn(decay)

    def update(ema_params: list[torch.Tensor], model_params: list[torch.Tensor], num_averaged) -> None:
        blend(
            ema_params, [p.to(e.dtype) for e, p in zip(ema_params, model_params, strict=True)], num_averaged
        )

    return update


class ModuleEMA(AveragedModel):
    """An fp32, frozen copy of ``module`` that tracks its weights' EMA.

    Create it from the live module *before* sharding it; the caller shards ``ema.module`` the same way.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(module, multi_avg_fn=_fp32_ema_update(decay), use_buffers=False)  # deep-copies
        for param in self.module.parameters():
            param.requires_grad_(False)
            if param.is_floating_point():
                param.data = param.data.float()
        self.decay = decay

    @property
    def num_updates(self) -> int:
        return int(self.n_averaged.item())

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self.n_averaged.fill_(value)


@contextlib.contextmanager
def swapped_in(live: nn.Module, ema: ModuleEMA) -> Iterator[nn.Module]:
    """Within the block, ``live`` holds the EMA weights; its own weights come back afterwards."""
    live_params = list(live.parameters())
    ema_params = list(ema.module.parameters())
    if len(live_params) != len(ema_params):
        raise ValueError("EMA copy and live module have different parameters")
    with torch.no_grad():
        saved = [p.detach().clone() for p in live_params]
        for param, averaged in zip(live_params, ema_params, strict=True):
            param.copy_(averaged.to(param.dtype))
    try:
        yield live
    finally:
        with torch.no_grad():
            for param, original in zip(live_params, saved, strict=True):
                param.copy_(original)
