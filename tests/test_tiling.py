"""Tiled encode / decode: exact for local maps, close for the tokenizers, tile-sized calls only."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from aligntok.models.decoder import DecoderConfig
from aligntok.models.encoders import RandomEncoderConfig
from aligntok.models.tiling import tile_starts, tiled_map
from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig


def _local_decoder(seed: int = 0) -> nn.Module:
    """x4 upsampling + two 3x3 convolutions: each output pixel sees inputs within 2 px (half a unit)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Upsample(scale_factor=4), nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))


def test_tile_starts_cover_the_length_with_the_overlap():
    assert tile_starts(8, 8, 2) == [0]
    assert tile_starts(20, 8, 2) == [0, 6, 12]
    starts = tile_starts(13, 6, 4)
    assert starts[0] == 0 and starts[-1] + 6 == 13
    assert all(b - a <= 6 - 4 for a, b in itertools.pairwise(starts))  # neighbours share >= the overlap


@pytest.mark.parametrize("height, width", [(13, 9), (16, 16), (7, 20)])
def test_tiled_map_equals_the_whole_map_for_a_local_operator(height, width):
    # Weights are zero on the outer quarter of every shared strip (4 units * 4 px / 4 = 4 px >= the
    # 2 px receptive radius), so every kept pixel is exact and the blend is a convex combination of equal
    # values: only rounding (~1e-7) remains.
    decoder = _local_decoder()
    z = torch.randn(2, 3, height, width)
    with torch.no_grad():
        whole = decoder(z)
        tiled = tiled_map(decoder, z, tile=6, overlap=4, in_per_unit=1, out_per_unit=4)
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


def test_tiled_map_calls_the_map_on_tiles_only_and_checks_its_sizes():
    shapes = []

    def record(x):
        shapes.append(tuple(x.shape[-2:]))
        return x.repeat_interleave(2, -1).repeat_interleave(2, -2)

    tiled_map(record, torch.randn(1, 3, 40, 24), tile=4, overlap=2, in_per_unit=4, out_per_unit=8)
    assert shapes and all(shape == (16, 16) for shape in shapes)  # 4 units of 4 px: memory follows the tile
    with pytest.raises(ValueError, match="must exceed overlap"):
        tiled_map(record, torch.randn(1, 3, 8, 8), tile=2, overlap=2, in_per_unit=1, out_per_unit=1)


def _tokenizer() -> AlignTokTokenizer:
    torch.manual_seed(0)
    return AlignTokTokenizer.from_config(TokenizerConfig(
        encoder="random",
        random_encoder=RandomEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, patch_size=4, image_size=16),
        latent_channels=8, adapter_hidden=16,
        decoder=DecoderConfig(base_channels=16, channel_mult=[1, 2, 2], layers_per_block=1, norm_groups=8),
    )).eval()  # fmt: skip


def test_tokenizer_tiling_is_off_by_default_and_leaves_one_tile_inputs_unchanged():
    tok = _tokenizer()
    assert tok.tiling is None
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z, image = tok.encode(x), tok.decode(torch.randn(1, 8, 8, 8))
        tok.enable_tiling(tile_latent_size=8, tile_overlap=2)
        assert torch.equal(tok.encode(x), z)  # one tile: the whole map
        tok.disable_tiling()
        assert tok.tiling is None
    with pytest.raises(ValueError, match="tile_latent_size > tile_overlap"):
        tok.enable_tiling(4, 4)
    assert image.shape == (1, 3, 32, 32)


def test_tokenizer_tiled_encode_and_decode_approach_whole_images():
    # Tiling is exact only for local maps (test above). The tokenizers have global parts that see one tile
    # instead of the image: the encoder's ViT attention, the decoder's mid-block attention and GroupNorm
    # statistics. With random weights these dominate much more than in a trained model, so the test
    # bounds the mean error at 20% of the whole output's std (a misplaced or dropped tile gives ~100%),
    # on stationary random latents with the decoder's attention zeroed (its residual makes it the
    # identity), leaving GroupNorm as the only global part; and it checks that larger tiles get closer.
    tok = _tokenizer()
    for name, module in tok.decoder.named_modules():
        if name.endswith("to_out.0"):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(1, 8, 24, 24, generator=torch.Generator().manual_seed(2))
    errors = []
    with torch.no_grad():
        latents, image = tok.encode(x), tok.decode(z)
        for tile, overlap in [(8, 4), (16, 8)]:
            tok.enable_tiling(tile_latent_size=tile, tile_overlap=overlap)
            latents_tiled, image_tiled = tok.encode(x), tok.decode(z)
            assert latents_tiled.shape == latents.shape and image_tiled.shape == image.shape
            errors.append((image_tiled - image).abs().mean() / image.std())
        assert (latents_tiled - latents).abs().mean() < 0.2 * latents.std()
    assert errors[1] < 0.2 and errors[1] < errors[0]
