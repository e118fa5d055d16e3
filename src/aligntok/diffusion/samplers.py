"""Samplers for velocity models: Euler and Heun ODE, Euler-Maruyama SDE, classifier-free guidance.

Time runs from ``t = 0`` (noise) to ``t = 1`` (data), the convention of :mod:`.transport` and of the
reference LightningDiT code (hustvl/LightningDiT), whose model is called with the same ``t``.

Guidance: ``uncond + cfg_scale * (cond - uncond)`` on the first ``cfg_channels`` latent channels (all
when ``None``, the textbook form); the other channels take the conditional velocity. The reference's
``forward_with_cfg`` guides only the first 3 channels (a leftover of DiT's 4-channel SD-VAE latents), and
the paper's scales (10 at 64 epochs, 6.7 at 800) are that reference's defaults: they were tuned with 3 of
32 channels guided, so used on every channel they over-guide. ``cfg_channels=3`` reproduces the reference
exactly, and is what the paper configs use.

Shared with the reference: the timestep shift ``t -> s t / (1 + (s - 1) t)`` on the uniform grid (s = 0.3
in the paper: small steps near the noise end; ``s = 0`` or ``1`` turns it off, as there) and the guidance
interval: guidance only where ``cfg_interval_start <= t <= cfg_interval_end``, with ``t`` the time the
model is called with; elsewhere the conditional velocity alone is used (one model call instead of two).
The reference has no end (ours defaults to 1) and starts at 0.10 in its 64-epoch config, 0.125 in its
800-epoch one (0.11 in its default config); the paper states 0.10.

One difference on purpose: ``num_steps`` is the number of integration steps. The reference integrates over
``linspace(0, 1, num_steps)``, i.e. ``num_steps - 1`` steps, so its "250 steps" is our 249.

The samplers return latents in the model's (normalised) space. Pass ``denormalize`` (e.g.
``lambda z: z * std + mean`` with the per-channel statistics the DiT was trained with) to get the
tokenizer's space.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

import torch

from aligntok.config import ConfigError, check_choice

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None

SAMPLING_METHODS = ("euler", "heun", "euler_maruyama")


@dataclasses.dataclass
class SamplerConfig:
    """How latents are integrated from noise to data."""

    method: str = "euler"  #: euler | heun (ODE) | euler_maruyama (SDE)
    num_steps: int = 250  #: integration steps (heun calls the model twice per step)
    cfg_scale: float = 1.0  #: classifier-free guidance scale; 1 = no guidance (paper: ~10 at 64 ep, 6.7 at 800, with cfg_channels=3)
    cfg_channels: int | None = None  #: guide only the first this-many latent channels (reference and paper: 3); None = all
    cfg_interval_start: float = 0.10  #: guidance only for t >= this (t=0 is noise); paper 0.10; reference 0.10 (64 ep), 0.125 (800 ep)
    cfg_interval_end: float = 1.0  #: ... and t <= this
    timestep_shift: float = 0.3  #: grid shift s in s*t/(1+(s-1)*t); 0 or 1 = uniform grid
    sde_diffusion: float = 1.0  #: euler_maruyama only: noise level w(t) = sde_diffusion * (1 - t)

    def validate(self) -> None:
        check_choice("method", self.method, SAMPLING_METHODS)
        if self.num_steps < 1:
            raise ConfigError(f"num_steps={self.num_steps} must be >= 1")
        if self.timestep_shift < 0:
            raise ConfigError(f"timestep_shift={self.timestep_shift} must be >= 0")
        if not 0.0 <= self.cfg_interval_start <= self.cfg_interval_end <= 1.0:
            raise ConfigError(
                f"need 0 <= cfg_interval_start <= cfg_interval_end <= 1, got {self.cfg_interval_start}, {self.cfg_interval_end}"
            )
        if self.sde_diffusion < 0:
            raise ConfigError(f"sde_diffusion={self.sde_diffusion} must be >= 0")
        if self.cfg_channels is not None and (isinstance(self.cfg_channels, bool) or self.cfg_channels < 1):
            raise ConfigError(f"cfg_channels={self.cfg_channels} must be a positive number of channels, or null for all")


def timestep_grid(num_steps: int, shift: float = 0.0) -> list[float]:
    """``num_steps + 1`` times from 0 (noise) to 1 (data), shifted as in the reference (0 = no shift)."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    grid = [i / num_steps for i in range(num_steps + 1)]
    if shift > 0 and shift != 1:
        grid = [shift * t / (1 + (shift - 1) * t) for t in grid]
    return grid


def batched_randn(
    batch_size: int, sample_shape: Sequence[int], generator: Generators = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard normal noise of shape (batch_size, *sample_shape) on ``device``, float32.

    With a list of generators, sample ``i`` comes from ``generator[i]`` alone, so a sample's noise does not
    depend on which batch (or process) it is drawn in. Noise is drawn on each generator's own device.
    """
    if isinstance(generator, Sequence):
        if len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
        draws = [torch.randn(tuple(sample_shape), generator=g, device=g.device) for g in generator]
        return torch.stack(draws).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn((batch_size, *sample_shape), generator=generator, device=gen_device).to(device)


def guided_velocity(
    model: VelocityModel,
    x: torch.Tensor,
    t: float,
    labels: torch.Tensor,
    *,
    cfg_scale: float,
    null_label: int | None,
    interval: tuple[float, float] = (0.0, 1.0),
    channels: int | None = None,
) -> torch.Tensor:
    """The velocity (B, C, H, W) at time ``t`` for every sample, guided when ``t`` is in ``interval``.

    ``uncond + cfg_scale * (cond - uncond)`` on the first ``channels`` channels (all when None) and the
    conditional velocity on the rest, with the conditional and unconditional halves in one batched model
    call: with ``channels=3`` this is the reference's ``forward_with_cfg`` (its conditional half).
    Outside the interval, or for ``cfg_scale == 1``, the conditional velocity alone (one call of batch B).

    Raises:
        ValueError: no null label to guide with, or ``channels`` exceeds the latent's C.
    """
    if channels is not None and channels > x.shape[1]:
        raise ValueError(f"cfg_channels={channels} exceeds the latent's {x.shape[1]} channels")
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    if cfg_scale == 1.0 or not interval[0] <= t <= interval[1]:
        return model(x, t_batch, labels).float()
    if null_label is None:
        raise ValueError("guidance needs a null label: the model has none (class_dropout_prob=0) and none was given")
    null = torch.full_like(labels, null_label)
    both = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([labels, null])).float()
    cond, uncond = both.chunk(2)
    if channels is None:
        return uncond + cfg_scale * (cond - uncond)
    guided = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


def _resolve_null_label(model: VelocityModel, null_label: int | None, config: SamplerConfig) -> int | None:
    if null_label is not None or config.cfg_scale == 1.0:
        return null_label
    return getattr(model, "null_label", None)


def _model_device(model: VelocityModel, fallback: torch.device) -> torch.device:
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return fallback


def sample(
    model: VelocityModel,
    labels: torch.Tensor,
    config: SamplerConfig | None = None,
    *,
    latent_shape: Sequence[int] | None = None,
    noise: torch.Tensor | None = None,
    generator: Generators = None,
    null_label: int | None = None,
    denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Integrate ``model`` from noise (t=0) to data (t=1) for class ``labels``; returns fp32 latents.

    Args:
        model: ``model(x, t, y) -> velocity`` (a LightningDiT or any callable of that form).
        labels: (B,) integer class labels.
        config: method, steps, guidance, interval, shift.
        latent_shape: (C, H, W) of one latent; defaults to the model's config. Ignored when ``noise`` is given.
        noise: the starting latents (B, C, H, W); drawn from ``generator`` otherwise.
        generator: one generator, or one per sample (see :func:`batched_randn`); also drives SDE noise.
        null_label: the "no class" label for guidance; defaults to ``model.null_label``.
        denormalize: applied to the final latents, e.g. to undo the tokenizer's per-channel normalisation.
    """
    config = config or SamplerConfig()
    config.validate()
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
    batch_size = labels.shape[0]
    device = _model_device(model, labels.device)
    labels = labels.to(device)
    null_label = _resolve_null_label(model, null_label, config)
    if noise is None:
        if latent_shape is None:
            model_config = getattr(model, "config", None)
            if model_config is None:
                raise ValueError("give latent_shape or noise: the model has no config to read the latent shape from")
            latent_shape = (model_config.in_channels, model_config.input_size, model_config.input_size)
        noise = batched_randn(batch_size, latent_shape, generator, device)
    elif noise.shape[0] != batch_size:
        raise ValueError(f"noise has batch {noise.shape[0]} but there are {batch_size} labels")
    x = noise.to(device=device, dtype=torch.float32)

    interval = (config.cfg_interval_start, config.cfg_interval_end)

    def velocity(state: torch.Tensor, t: float) -> torch.Tensor:
        return guided_velocity(
            model, state, t, labels, cfg_scale=config.cfg_scale, null_label=null_label, interval=interval,
            channels=config.cfg_channels,
        )

    grid = timestep_grid(config.num_steps, config.timestep_shift)
    with torch.inference_mode():
        for step, (t, t_next) in enumerate(itertools.pairwise(grid)):
            dt = t_next - t
            v = velocity(x, t)
            if config.method == "euler":
                x = x + dt * v
            elif config.method == "heun":
                predicted = x + dt * v
                x = x + 0.5 * dt * (v + velocity(predicted, t_next))
            else:
                x = _euler_maruyama_step(x, v, t, dt, config.sde_diffusion, last=step == config.num_steps - 1, generator=generator)
        return denormalize(x) if denormalize is not None else x


def _euler_maruyama_step(
    x: torch.Tensor, v: torch.Tensor, t: float, dt: float, diffusion: float, *, last: bool, generator: Generators
) -> torch.Tensor:
    """One step of dx = [v + w s] dt + sqrt(2 w) dW with w(t) = diffusion * (1 - t).

    For the linear path the score is s = (t v - x) / (1 - t), so w s = diffusion * (t v - x): no division,
    nothing singular at either end. Any w keeps the ODE's marginals. The last step adds no noise (the
    reference's "mean" last step).
    """
    drift = v + diffusion * (t * v - x)
    x = x + dt * drift
    if last or diffusion == 0:
        return x
    noise = batched_randn(x.shape[0], x.shape[1:], generator, x.device)
    return x + math.sqrt(2 * diffusion * (1 - t) * dt) * noise
