"""Rectified-flow transport: path, timestep sampling, loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aligntok.config import ConfigError, load_config
from aligntok.diffusion.transport import (
    Transport,
    TransportConfig,
    interpolate,
    velocity_loss,
)


def test_path_runs_from_noise_at_t0_to_data_at_t1():
    data, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    x_t, target = interpolate(data, noise, torch.tensor([0.0, 1.0, 0.25]))
    torch.testing.assert_close(x_t[0], noise[0])
    torch.testing.assert_close(x_t[1], data[1])
    torch.testing.assert_close(x_t[2], 0.25 * data[2] + 0.75 * noise[2])
    torch.testing.assert_close(target, data - noise)
    # The target is the time derivative of the path.
    t, h = torch.full((3,), 0.4), 1e-3
    finite_difference = (interpolate(data, noise, t + h)[0] - interpolate(data, noise, t - h)[0]) / (2 * h)
    torch.testing.assert_close(finite_difference, target, atol=1e-3, rtol=1e-3)


def test_loss_is_zero_for_the_exact_velocity():
    data, noise = torch.randn(4, 8, 4, 4), torch.randn(4, 8, 4, 4)
    labels = torch.tensor([0, 1, 2, 3])

    def exact_model(x_t, t, y):
        assert torch.equal(y, labels)
        return data - noise

    total, logs = Transport().loss(exact_model, data, {"y": labels}, noise=noise)
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    assert logs["mse"].item() == 0.0 and logs["cos"].item() == pytest.approx(0.0, abs=1e-6)


def test_loss_is_mse_plus_weighted_cosine_over_channels():
    predicted, target = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    total, logs = velocity_loss(predicted, target, cosine_weight=0.5)
    mse = ((predicted - target) ** 2).mean()
    cosine = (1 - F.cosine_similarity(predicted, target, dim=1)).mean()
    torch.testing.assert_close(total, mse + 0.5 * cosine)
    torch.testing.assert_close(logs["mse"], mse)
    torch.testing.assert_close(logs["cos"], cosine)
    total_off, logs_off = velocity_loss(predicted, target, cosine_weight=0.0)
    torch.testing.assert_close(total_off, mse)
    assert "cos" not in logs_off


def test_loss_is_fp32_and_differentiable_for_a_bf16_model():
    weight = torch.nn.Parameter(torch.ones(()))

    def bf16_model(x_t, t):
        return (x_t * weight).to(torch.bfloat16)

    total, logs = Transport().loss(bf16_model, torch.randn(2, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in logs.values())
    assert not any(v.requires_grad for v in logs.values())
    total.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad)


def test_loss_uses_the_drawn_time_and_noise():
    seen = {}

    def recording_model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    data = torch.randn(6, 2, 3, 3)
    _total, logs = Transport().loss(recording_model, data, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)  # the same draws, in the documented order: noise, then t
    noise = torch.randn(data.shape, generator=gen)
    t = Transport().sample_time(6, generator=gen)
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], interpolate(data, noise, t)[0])
    torch.testing.assert_close(logs["mse"], ((data - noise) ** 2).mean())


def test_lognormal_time_is_in_the_open_unit_interval_with_the_configured_logit_moments():
    transport = Transport(TransportConfig(lognormal_mean=0.5, lognormal_std=0.8))
    t = transport.sample_time(20000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (20000,)
    assert bool((t > 0).all() and (t < 1).all())
    logit = torch.logit(t.double())
    assert logit.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logit.std().item() == pytest.approx(0.8, abs=0.03)


def test_uniform_time_and_determinism():
    transport = Transport(TransportConfig(time_sampling="uniform"))
    t = transport.sample_time(20000, generator=torch.Generator().manual_seed(0))
    assert bool((t >= 0).all() and (t < 1).all())
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    again = transport.sample_time(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    assert not torch.equal(t, transport.sample_time(20000, generator=torch.Generator().manual_seed(1)))


def test_bad_config_and_inputs_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="time_sampling='beta' is not one of"):
        Transport(TransportConfig(time_sampling="beta"))
    with pytest.raises(ConfigError, match="lognormal_std"):
        load_config(TransportConfig, overrides=["lognormal_std=0"])
    with pytest.raises(ConfigError, match="unknown config key 'cosine'"):
        load_config(TransportConfig, overrides=["cosine=1"])
    with pytest.raises(ValueError, match="does not match the target"):
        Transport().loss(lambda x, t: x[:, :1], torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="t must have shape"):
        interpolate(torch.randn(2, 3), torch.randn(2, 3), torch.rand(3))
