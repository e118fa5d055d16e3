"""Samplers: ODE/SDE integration against a closed form, guidance, the guidance interval, the shift."""

from __future__ import annotations

import itertools

import pytest
import torch

from aligntok.config import ConfigError
from aligntok.diffusion.samplers import (
    SamplerConfig,
    batched_randn,
    guided_velocity,
    sample,
    timestep_grid,
)
from aligntok.models.lightningdit import LightningDiT, LightningDiTConfig

CHANNELS = 6
NULL = 3


class GaussianVelocity:
    """The exact velocity field of the linear path (t=0 noise, t=1 data) when the data of class y is
    N(mean_y, std^2) per channel. Class NULL is the unconditional one. Records every call."""

    def __init__(self) -> None:
        self.means = torch.linspace(-1.5, 2.0, (NULL + 1) * CHANNELS).reshape(NULL + 1, CHANNELS)
        self.std = torch.linspace(0.3, 1.7, CHANNELS)
        self.calls: list[tuple[int, float]] = []  # (batch size, t)

    def endpoint(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Where the ODE takes ``noise``: x(1) = mean + std * x(0)."""
        return self._expand(self.means[labels]) + self._expand(self.std) * noise

    @staticmethod
    def _expand(v: torch.Tensor) -> torch.Tensor:
        return v[..., None, None]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], float(t[0])))
        a = t.double()[:, None, None, None]
        b = 1 - a
        mean, var = self._expand(self.means[y]).double(), self._expand(self.std).double() ** 2
        slope = (a * var - b) / (a * a * var + b * b)
        return (mean + slope * (x.double() - a * mean)).float()


def test_timestep_grid_and_shift():
    assert timestep_grid(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert timestep_grid(4, shift=1.0) == timestep_grid(4, shift=0.0)
    shifted = timestep_grid(4, shift=0.3)
    assert shifted[0] == 0.0 and shifted[-1] == pytest.approx(1.0)
    assert shifted[2] == pytest.approx(0.3 * 0.5 / (1 - 0.7 * 0.5))  # s t / (1 + (s - 1) t)
    assert all(a < b for a, b in itertools.pairwise(shifted))
    assert shifted[1] < 0.25  # s < 1 puts the small steps at the noise end


def test_guidance_scale_one_is_the_unguided_model():
    model = GaussianVelocity()
    x, labels = torch.randn(4, CHANNELS, 3, 3), torch.tensor([0, 1, 2, 0])
    out = guided_velocity(model, x, 0.5, labels, cfg_scale=1.0, null_label=NULL)
    assert torch.equal(out, model(x, torch.full((4,), 0.5), labels))
    config = SamplerConfig(num_steps=8, cfg_scale=1.0, cfg_interval_start=0.0)
    model.calls.clear()
    guided = sample(model, labels, config, noise=x, null_label=NULL)
    unguided = sample(model, labels, SamplerConfig(num_steps=8, cfg_scale=1.0), noise=x)
    assert torch.equal(guided, unguided)
    assert all(size == 4 for size, _ in model.calls)  # no unconditional pass was made


def test_guidance_acts_on_every_channel_by_default():
    model = GaussianVelocity()
    x, labels = torch.randn(2, CHANNELS, 3, 3), torch.tensor([1, 2])
    t = torch.full((2,), 0.6)
    cond, uncond = model(x, t, labels), model(x, t, torch.full((2,), NULL))
    out = guided_velocity(model, x, 0.6, labels, cfg_scale=4.0, null_label=NULL)
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond))
    # Every channel, not only the first three (the reference's choice), differs from the conditional output.
    assert bool((out - cond).abs().amax(dim=(0, 2, 3)).gt(1e-3).all())


def test_cfg_channels_guides_only_the_first_channels():
    model = GaussianVelocity()
    x, labels = torch.randn(2, CHANNELS, 3, 3), torch.tensor([1, 2])
    t = torch.full((2,), 0.6)
    cond, uncond = model(x, t, labels), model(x, t, torch.full((2,), NULL))
    out = guided_velocity(model, x, 0.6, labels, cfg_scale=4.0, null_label=NULL, channels=3)
    torch.testing.assert_close(out[:, :3], (uncond + 4.0 * (cond - uncond))[:, :3])
    assert torch.equal(out[:, 3:], cond[:, 3:])
    every = guided_velocity(model, x, 0.6, labels, cfg_scale=4.0, null_label=NULL, channels=CHANNELS)
    torch.testing.assert_close(every, guided_velocity(model, x, 0.6, labels, cfg_scale=4.0, null_label=NULL))
    # Through the sampler: only the guided channels move away from the unguided trajectory.
    config = SamplerConfig(num_steps=6, cfg_scale=4.0, cfg_channels=2, cfg_interval_start=0.0)
    guided = sample(model, labels, config, noise=x, null_label=NULL)
    unguided = sample(model, labels, SamplerConfig(num_steps=6), noise=x)
    assert torch.equal(guided[:, 2:], unguided[:, 2:])
    assert not torch.allclose(guided[:, :2], unguided[:, :2])
    with pytest.raises(ValueError, match="cfg_channels=7 exceeds the latent's 6 channels"):
        guided_velocity(model, x, 0.6, labels, cfg_scale=4.0, null_label=NULL, channels=7)
    with pytest.raises(ConfigError, match="cfg_channels=0 must be a positive number"):
        SamplerConfig(cfg_channels=0).validate()


def test_guidance_interval_switches_exactly_where_set():
    model = GaussianVelocity()
    x, labels = torch.randn(2, CHANNELS, 3, 3), torch.tensor([0, 1])
    cond = model(x, torch.full((2,), 0.3), labels)
    just_before = guided_velocity(model, x, 0.3 - 1e-9, labels, cfg_scale=3.0, null_label=NULL, interval=(0.3, 0.8))
    at_start = guided_velocity(model, x, 0.3, labels, cfg_scale=3.0, null_label=NULL, interval=(0.3, 0.8))
    torch.testing.assert_close(just_before, model(x, torch.full((2,), 0.3 - 1e-9), labels))
    assert not torch.allclose(at_start, cond)

    model.calls.clear()
    config = SamplerConfig(method="euler", num_steps=10, cfg_scale=3.0, cfg_interval_start=0.3, cfg_interval_end=0.8, timestep_shift=0.0)
    sample(model, labels, config, noise=x, null_label=NULL)
    guided_times = [t for size, t in model.calls if size == 4]
    plain_times = [t for size, t in model.calls if size == 2]
    assert guided_times == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert plain_times == pytest.approx([0.0, 0.1, 0.2, 0.9])


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_euler_and_heun_reach_the_closed_form_and_agree(shift):
    model = GaussianVelocity()
    labels = torch.tensor([0, 1, 2, 3, 1])
    noise = torch.randn(5, CHANNELS, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = model.endpoint(noise, labels)

    def run(method: str, steps: int) -> torch.Tensor:
        return sample(model, labels, SamplerConfig(method=method, num_steps=steps, timestep_shift=shift), noise=noise)

    euler_many, heun_few = run("euler", 2000), run("heun", 50)
    euler_few = run("euler", 50)
    error = lambda z: (z - exact).abs().max().item()
    # |endpoint| reaches ~5 here; Euler's error shrinks as 1/steps (~8e-3 at 1000 steps), Heun's as 1/steps^2.
    assert error(euler_many) < 6e-3
    assert error(heun_few) < 6e-3
    torch.testing.assert_close(euler_many, heun_few, atol=8e-3, rtol=0)
    assert error(heun_few) < error(euler_few) / 10  # second order beats first order at equal steps


def test_euler_maruyama_reaches_the_target_distribution():
    model = GaussianVelocity()
    labels = torch.full((4000,), 2)
    config = SamplerConfig(method="euler_maruyama", num_steps=200, timestep_shift=0.0, sde_diffusion=1.0)
    out = sample(model, labels, config, latent_shape=(CHANNELS, 1, 1), generator=torch.Generator().manual_seed(0))
    per_channel = out.flatten(1)
    torch.testing.assert_close(per_channel.mean(0), model.means[2], atol=0.08, rtol=0)
    torch.testing.assert_close(per_channel.std(0), model.std, atol=0.08, rtol=0.05)
    # The SDE really is stochastic: the same start gives different ends with different noise.
    noise = torch.randn(2, CHANNELS, 1, 1)
    a = sample(model, labels[:2], config, noise=noise, generator=torch.Generator().manual_seed(1))
    b = sample(model, labels[:2], config, noise=noise, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("method", ["euler", "euler_maruyama"])
def test_per_sample_generators_make_samples_independent_of_batching(method):
    model = GaussianVelocity()
    labels = torch.tensor([0, 1, 2, 0])
    config = SamplerConfig(method=method, num_steps=6, cfg_scale=2.0, cfg_interval_start=0.1)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    kwargs = {"latent_shape": (CHANNELS, 2, 2), "null_label": NULL}
    whole = sample(model, labels, config, generator=gens([10, 11, 12, 13]), **kwargs)
    halves = torch.cat([
        sample(model, labels[:2], config, generator=gens([10, 11]), **kwargs),
        sample(model, labels[2:], config, generator=gens([12, 13]), **kwargs),
    ])  # fmt: skip
    assert torch.equal(whole, halves)
    again = sample(model, labels, config, generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(again, sample(model, labels, config, generator=torch.Generator().manual_seed(5), **kwargs))
    assert not torch.equal(again, sample(model, labels, config, generator=torch.Generator().manual_seed(6), **kwargs))


def test_denormalize_hook_is_applied_to_the_result():
    model = GaussianVelocity()
    labels, noise = torch.tensor([0, 1]), torch.randn(2, CHANNELS, 2, 2)
    config = SamplerConfig(num_steps=4)
    mean, std = torch.arange(CHANNELS).float()[:, None, None], torch.full((CHANNELS, 1, 1), 2.0)
    plain = sample(model, labels, config, noise=noise)
    denormalised = sample(model, labels, config, noise=noise, denormalize=lambda z: z * std + mean)
    torch.testing.assert_close(denormalised, plain * std + mean)


def test_sampling_a_tiny_lightningdit_with_guidance():
    torch.manual_seed(0)
    model = LightningDiT(LightningDiTConfig(input_size=4, patch_size=1, in_channels=8, hidden_size=32, depth=1, num_heads=2, num_classes=5)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    config = SamplerConfig(method="heun", num_steps=3, cfg_scale=4.0)
    labels = torch.tensor([0, 4])
    out = sample(model, labels, config, generator=torch.Generator().manual_seed(0))  # null label and shape from the model
    assert out.shape == (2, 8, 4, 4) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    unguided = sample(model, labels, SamplerConfig(method="heun", num_steps=3), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out, unguided)

    no_null = LightningDiT(LightningDiTConfig(input_size=4, in_channels=8, hidden_size=32, depth=1, num_heads=2, num_classes=5, class_dropout_prob=0.0))
    with pytest.raises(ValueError, match="guidance needs a null label"):
        sample(no_null, labels, config)


def test_bad_settings_fail_with_one_line_errors():
    model = GaussianVelocity()
    labels = torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="method='dopri5' is not one of"):
        sample(model, labels, SamplerConfig(method="dopri5"), latent_shape=(CHANNELS, 1, 1))
    with pytest.raises(ConfigError, match="num_steps=0"):
        sample(model, labels, SamplerConfig(num_steps=0), latent_shape=(CHANNELS, 1, 1))
    with pytest.raises(ConfigError, match="cfg_interval_start <= cfg_interval_end"):
        SamplerConfig(cfg_interval_start=0.9, cfg_interval_end=0.5).validate()
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        batched_randn(3, (1,), [torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor"):
        sample(model, torch.tensor([[0, 1]]), latent_shape=(CHANNELS, 1, 1))
    with pytest.raises(ValueError, match="give latent_shape or noise"):
        sample(model, labels)
    with pytest.raises(ValueError, match="noise has batch 3"):
        sample(model, labels, noise=torch.randn(3, CHANNELS, 1, 1))
