"""Rectified-flow diffusion on tokenizer latents: the transport (path, timesteps, loss) and samplers.

Time runs from t = 0 (noise) to t = 1 (data), as in the reference LightningDiT code; see
:mod:`aligntok.diffusion.transport` for how this maps onto the paper's notation.
"""

from aligntok.diffusion.samplers import (
    SAMPLING_METHODS,
    SamplerConfig,
    batched_randn,
    guided_velocity,
    sample,
    timestep_grid,
)
from aligntok.diffusion.transport import (
    Transport,
    TransportConfig,
    interpolate,
    velocity_loss,
)

__all__ = [
    "SAMPLING_METHODS",
    "SamplerConfig",
    "Transport",
    "TransportConfig",
    "batched_randn",
    "guided_velocity",
    "interpolate",
    "sample",
    "timestep_grid",
    "velocity_loss",
]
