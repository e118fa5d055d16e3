"""The T2I transformer wrapper: packing and ids, DiT init, the time/velocity conventions, the text mask,
save/load, presets."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from aligntok.config import ConfigError
from aligntok.diffusion.samplers import SamplerConfig, sample
from aligntok.models.t2i import (
    T2I_PRESETS,
    T2IConfig,
    T2ITransformer,
    count_parameters,
    image_ids,
    pack_latents,
    unpack_latents,
)

TINY = T2IConfig(in_channels=4, num_layers=1, num_single_layers=2, num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6),
                 text_dim=8, pooled_dim=6)


def _inputs(batch: int = 2, h: int = 4, w: int = 6, length: int = 5, cfg: T2IConfig = TINY, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    text = torch.randn(batch, length, cfg.text_dim, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    return x, text, mask, pooled


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero weights everywhere (the DiT init zeroes the output, which would hide every effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("pack,h,w", [(1, 4, 4), (1, 3, 5), (2, 4, 8), (2, 6, 2)])
def test_pack_round_trip_and_ids_match_flux_pipeline(pack, h, w):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    x = torch.randn(2, 3, h, w)
    tokens = pack_latents(x, pack)
    assert tokens.shape == (2, (h // pack) * (w // pack), 3 * pack * pack)
    assert torch.equal(unpack_latents(tokens, pack, h, w), x)
    if pack == 2:  # diffusers' own packing gives the same tokens
        assert torch.equal(tokens, FluxPipeline._pack_latents(x, 2, 3, h, w))
    expected = FluxPipeline._prepare_latent_image_ids(2, h // pack, w // pack, "cpu", torch.float32)
    assert torch.equal(image_ids(h // pack, w // pack), expected)


def test_output_is_zero_and_blocks_are_identities_at_initialisation():
    torch.manual_seed(0)
    model = T2ITransformer(TINY).eval()
    x, text, mask, pooled = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, torch.rand(2), text, mask, pooled), torch.zeros_like(x))
    flux = model.transformer
    zeroed = [b.norm1.linear for b in flux.transformer_blocks] + [b.norm.linear for b in flux.single_transformer_blocks]
    assert all(not m.weight.any() and not m.bias.any() for m in [*zeroed, flux.norm_out.linear, flux.proj_out])
    # the embedders are not zero: the model can learn from step 1
    assert flux.x_embedder.weight.abs().sum() > 0 and flux.context_embedder.weight.abs().sum() > 0


class _KnownField(nn.Module):
    """A stand-in for FluxTransformer2DModel with diffusers' conventions: x_sigma = (1 - sigma) data +
    sigma noise, velocity noise - data, for one known (packed) data point."""

    def __init__(self, data_tokens: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("data", data_tokens)

    def forward(self, hidden_states, timestep, **kwargs):
        sigma = timestep.reshape(-1, 1, 1)
        return ((hidden_states - self.data) / sigma,)


@pytest.mark.parametrize("pack", [1, 2])
def test_sampling_a_known_velocity_field_through_the_wrapper_lands_on_its_data(pack):
    cfg = dataclasses.replace(TINY, pack=pack)
    model = T2ITransformer(cfg).eval()
    target = torch.randn(3, cfg.in_channels, 4, 6)
    model.transformer = _KnownField(pack_latents(target, pack))
    _, text, mask, pooled = _inputs(batch=3)

    def velocity(x, t, labels):
        return model(x, t, text, mask, pooled)

    # aligntok's Euler sampler, t from 0 (noise) to 1 (data); sigma = 1 - t stays >= 1/8 on the grid.
    noise = torch.randn(3, cfg.in_channels, 4, 6)
    out = sample(velocity, torch.zeros(3, dtype=torch.long), SamplerConfig(num_steps=8, timestep_shift=0), noise=noise)
    assert torch.allclose(out, target, atol=1e-5)


def test_aligntok_sampler_through_the_wrapper_matches_diffusers_euler():
    """Real weights: aligntok's Euler sampler through the wrapper equals a diffusers-convention Euler loop
    (sigma 1 -> 0, x += (sigma_next - sigma) * v) on the bare FluxTransformer2DModel."""
    torch.manual_seed(0)
    model = _randomise(T2ITransformer(TINY)).eval()
    x0, text, mask, pooled = _inputs(batch=2)
    labels = torch.arange(2)

    def velocity(x, t, y):
        return model(x, t, text[y], mask[y], pooled[y])

    ours = sample(velocity, labels, SamplerConfig(num_steps=6, timestep_shift=0), noise=x0)
    flux = model.transformer
    x = pack_latents(x0, 1)
    sigmas = torch.linspace(1, 0, 7)
    with torch.no_grad():
        for s, s_next in itertools.pairwise(sigmas):
            v = flux(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=torch.full((2,), float(s)), img_ids=image_ids(4, 6), txt_ids=torch.zeros(5, 3),
                     return_dict=False)[0]
            x = x + (s_next - s) * v
    assert torch.allclose(ours, unpack_latents(x, 1, 4, 6), atol=1e-4)


def test_text_mask_makes_padding_irrelevant():
    torch.manual_seed(0)
    model = _randomise(T2ITransformer(TINY)).eval()
    x, text, mask, pooled = _inputs(length=6)
    mask[:, 4:] = False
    other = text.clone()
    other[:, 4:] = torch.randn(2, 2, TINY.text_dim) * 5
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        a, b = model(x, t, text, mask, pooled), model(x, t, other, mask, pooled)
        assert torch.allclose(a, b, atol=1e-5)
        # without the mask the padding does change the output (so the check above can fail) ...
        assert not torch.allclose(model(x, t, text, None, pooled), model(x, t, other, None, pooled), atol=1e-3)
        # ... and mask_padding=False reproduces the unmasked model
        model.config = dataclasses.replace(model.config, mask_padding=False)
        assert torch.equal(model(x, t, other, mask, pooled), model(x, t, other, None, pooled))


def test_attention_never_uses_the_cudnn_kernel():
    # cuDNN's SDPA backward failed FLUX-2B's training step on an H200 (module doc); on a CPU the switch is
    # what can be checked: it is off inside every block's forward and restored afterwards.
    model = T2ITransformer(TINY).eval()
    seen = []
    for block in [*model.transformer.transformer_blocks, *model.transformer.single_transformer_blocks]:
        block.register_forward_pre_hook(lambda module, args: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with torch.no_grad():
        model(*_inputs()[:1], torch.tensor([0.3, 0.7]), *_inputs()[1:])
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_save_and_load_give_identical_outputs(tmp_path):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, pack=2)
    model = _randomise(T2ITransformer(cfg)).eval()
    model.save_pretrained(tmp_path / "m", extra={"latent_mean": [0.0] * 4})
    loaded = T2ITransformer.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == cfg
    x, text, mask, pooled = _inputs(h=4, w=8)
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        assert torch.equal(model(x, t, text, mask, pooled), loaded(x, t, text, mask, pooled))
        bare = FluxTransformer2DModel.from_pretrained(str(tmp_path / "m" / "transformer"))
        assert sum(p.numel() for p in bare.parameters()) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="not a T2I model directory"):
        T2ITransformer.from_pretrained(tmp_path)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = _randomise(T2ITransformer(TINY))
    ckpt = T2ITransformer(dataclasses.replace(TINY, gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, text, mask, pooled = _inputs()
    for m in (plain, ckpt):
        m.train()
        m(x, torch.tensor([0.3, 0.6]), text, mask, pooled).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_presets_and_the_2b_parameter_count():
    assert set(T2I_PRESETS) == {"FLUX-tiny", "FLUX-S", "FLUX-1B", "FLUX-2B", "FLUX.1-12B"}
    assert "INFERRED" in T2I_PRESETS["FLUX-2B"][5]
    two_b = T2IConfig.from_preset("FLUX-2B", in_channels=32, text_dim=4096, pooled_dim=768)
    assert two_b.width == 1536
    assert 2.15e9 < count_parameters(two_b) < 2.25e9  # 2.20 B (T2I.md §1.5, meta device)
    flux1 = T2IConfig.from_preset("FLUX.1-12B", in_channels=16, pack=2, text_dim=4096, pooled_dim=768)
    assert 11.8e9 < count_parameters(flux1) < 12.0e9  # FLUX.1 without its guidance embedding: 11.90 B
    with pytest.raises(ConfigError, match="fixed by preset"):
        T2IConfig.from_preset("FLUX-tiny", num_heads=3)
    with pytest.raises(ConfigError, match="axes_dims_rope"):
        T2IConfig(head_dim=16, axes_dims_rope=(4, 5, 7)).validate()
