"""Exponential moving average of a module's weights, kept in fp32.

Built on :class:`torch.optim.swa_utils.AveragedModel` with ``get_ema_multi_avg_fn`` (one fused
``_foreach_lerp_`` per dtype group). The first update copies the weights; later ones blend them in with
weight ``1 - decay``. Buffers are not averaged but copied from the live module, as is usual for EMA.

With ``warmup``, update ``n`` (counting the copy as update 0) uses ``min(decay, (1 + n) / (10 + n))``,
the warm-up of LDM's ``LitEma`` (and TensorFlow's ExponentialMovingAverage with ``num_updates``): early
updates average over the few steps there are instead of lagging ``decay / (1 - decay)`` steps behind,
so the EMA of a run much shorter than that lag is not stuck near the run's starting weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def warmup_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (the copy being update 0) under the LitEma warm-up."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class ModuleEMA(AveragedModel):
    """An fp32, frozen copy of ``module`` that tracks its weights' EMA (``warmup``: see the module docstring).

    Create it from the live module *before* sharding it; the caller shards ``ema.module`` the same way.
    """

    def __init__(self, module: nn.Module, decay: float, *, warmup: bool = False) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self._updates = 0  # python mirror of n_averaged: the warm-up decay needs no device sync
        super().__init__(module, multi_avg_fn=self._blend, use_buffers=False)  # deep-copies
        for param in self.module.parameters():
            param.requires_grad_(False)
            if param.is_floating_point():
                param.data = param.data.float()
        self.decay = decay
        self.warmup = warmup

    def _blend(self, ema_params: list[torch.Tensor], model_params: list[torch.Tensor], num_averaged) -> None:
        """EMA update that accepts a low-precision live model (its weights are upcast before blending)."""
        decay = warmup_decay(self.decay, self._updates) if self.warmup else self.decay
        get_ema_multi_avg_fn(decay)(
            ema_params, [p.to(e.dtype) for e, p in zip(ema_params, model_params, strict=True)], num_averaged
        )

    def update_parameters(self, model: nn.Module) -> None:
        super().update_parameters(model)
        self._updates += 1

    @property
    def num_updates(self) -> int:
        return int(self.n_averaged.item())

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self.n_averaged.fill_(value)
        self._updates = int(value)


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
