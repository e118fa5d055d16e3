"""Rectified-flow transport: the linear path between noise and latents, timestep sampling and the loss.

Time convention (the reference LightningDiT/SiT code's, so that its checkpoints and samplers agree with
ours): ``t = 0`` is pure noise and ``t = 1`` is data,

    x_t = t * x_data + (1 - t) * noise,        velocity target u = x_data - noise.

The paper writes the same path the other way round, ``z_t = (1 - s) z_0 + s eps`` with target
``eps - z_0``; the two are identical under ``s = 1 - t`` (and a sign flip of the velocity). Log-normal
timestep sampling (SD3's logit-normal: ``t = sigmoid(n)``, ``n ~ N(mean, std)``) is symmetric for the
default mean 0, so both conventions sample the same distribution; a positive ``lognormal_mean`` here
favours the data end (t near 1).

The loss is the reference's: mean squared error on the velocity plus, optionally, ``1 - cos`` between
predicted and target velocity, taken over the channel axis at every position. All loss maths run in fp32
whatever precision the model runs in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from aligntok.config import ConfigError, check_choice

VelocityModel = Callable[..., torch.Tensor]


@dataclasses.dataclass
class TransportConfig:
    """How training timesteps are drawn and how the velocity loss is weighted."""

    time_sampling: str = "lognormal"  #: lognormal (logit-normal, the reference's use_lognorm) | uniform
    lognormal_mean: float = 0.0  #: mean of the normal whose sigmoid is t (t=1 is data; see module doc)
    lognormal_std: float = 1.0  #: std of that normal
    cosine_weight: float = 1.0  #: weight of the 1 - cos(v_pred, v_target) term over channels; 0 turns it off

    def validate(self) -> None:
        check_choice("time_sampling", self.time_sampling, ("lognormal", "uniform"))
        if self.lognormal_std <= 0:
            raise ConfigError(f"lognormal_std={self.lognormal_std} must be positive")
        if self.cosine_weight < 0:
            raise ConfigError(f"cosine_weight={self.cosine_weight} must be >= 0")


def interpolate(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The point ``x_t`` on the linear path and the velocity target ``data - noise`` (t: one per sample)."""
    if data.shape != noise.shape:
        raise ValueError(f"data {tuple(data.shape)} and noise {tuple(noise.shape)} must have the same shape")
    if t.shape != data.shape[:1]:
        raise ValueError(f"t must have shape ({data.shape[0]},), got {tuple(t.shape)}")
    t_b = t.reshape(-1, *([1] * (data.ndim - 1))).to(data.dtype)
    return t_b * data + (1 - t_b) * noise, data - noise


def velocity_loss(
    predicted: torch.Tensor, target: torch.Tensor, cosine_weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE (+ ``cosine_weight`` * mean ``1 - cos`` over dim 1) in fp32, with its detached parts."""
    if predicted.shape != target.shape:
        raise ValueError(f"model output {tuple(predicted.shape)} does not match the target {tuple(target.shape)}")
    predicted, target = predicted.float(), target.float()
    mse = (predicted - target).square().mean()
    logs = {"mse": mse.detach()}
    total = mse
    if cosine_weight > 0:
        cosine = (1 - F.cosine_similarity(predicted, target, dim=1)).mean()
        total = total + cosine_weight * cosine
        logs["cos"] = cosine.detach()
    logs["loss"] = total.detach()
    return total, logs


class Transport:
    """Rectified flow with velocity prediction: draws t and noise, builds x_t, returns the loss."""

    def __init__(self, config: TransportConfig | None = None) -> None:
        self.config = config or TransportConfig()
        self.config.validate()

    def sample_time(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``batch_size`` training times in [0, 1] (float32), from ``generator`` when given."""
        gen_device = generator.device if generator is not None else device
        if self.config.time_sampling == "uniform":
            t = torch.rand(batch_size, generator=generator, device=gen_device)
        else:
            normal = torch.randn(batch_size, generator=generator, device=gen_device)
            t = torch.sigmoid(normal * self.config.lognormal_std + self.config.lognormal_mean)
        return t.to(device)

    def loss(
        self,
        model: VelocityModel,
        latents: torch.Tensor,
        model_kwargs: Mapping[str, Any] | None = None,
        *,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of ``model(x_t, t, **model_kwargs)`` against the velocity target for clean ``latents``.

        ``noise`` and ``t`` are drawn (from ``generator`` if given) unless passed in. Returns the fp32
        total and a dict of detached fp32 scalars: ``loss``, ``mse`` and, when on, ``cos``.
        """
        if latents.ndim < 2:
            raise ValueError(f"latents must be batched, got shape {tuple(latents.shape)}")
        if noise is None:
            gen_device = generator.device if generator is not None else latents.device
            noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=latents.dtype)
            noise = noise.to(latents.device)
        if t is None:
            t = self.sample_time(latents.shape[0], latents.device, generator)
        x_t, target = interpolate(latents, noise, t)
        predicted = model(x_t, t, **(model_kwargs or {}))
        return velocity_loss(predicted, target, self.config.cosine_weight)


def resolution_shift(
    num_tokens: int, base: tuple[int, float] = (256, 0.5), top: tuple[int, float] = (4096, 1.15)
) -> float:
    """aligntok's time shift ``s`` for ``num_tokens`` image tokens: 1 / exp(mu), FLUX's linear mu rule
    (diffusers ``calculate_shift``). 256 tokens -> 1/1.65 = 0.61; 1024 tokens -> 1/1.88 = 0.53."""
    slope = (top[1] - base[1]) / (top[0] - base[0])
    return math.exp(-(base[1] + slope * (num_tokens - base[0])))


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``s t / (1 + (s - 1) t)``: the sampler's grid shift applied to training times (s < 1: towards noise)."""
    return t if shift == 1 else shift * t / (1 + (shift - 1) * t)
