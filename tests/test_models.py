"""Tokenizer models: foundation encoders, adapter, decoder, discriminator, save/load of the tokenizer."""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    Siglip2Config,
    Siglip2Model,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    ViTMAEConfig,
    ViTMAEModel,
)
from transformers.models.siglip2.image_processing_siglip2 import (
    convert_image_to_patches,
)

from aligntok.config import ConfigError, load_config
from aligntok.models.adapter import Adapter
from aligntok.models.decoder import DecoderConfig, LatentDecoder
from aligntok.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from aligntok.models.encoders import (
    IMAGENET_MEAN,
    EncoderNotFoundError,
    RandomEncoderConfig,
    build_encoder_from_config,
    load_encoder,
)
from aligntok.models.tokenizer import (
    AlignTokTokenizer,
    TokenizerConfig,
    TokenizerNotFoundError,
)

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
STRIDE = 4  # tiny decoder: channel_mult [1, 2, 2]
IMAGE = 16  # px; a 4x4 latent grid


def tiny_config(**overrides) -> TokenizerConfig:
    cfg = TokenizerConfig(
        encoder="random",
        random_encoder=RandomEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, patch_size=4, image_size=16),
        latent_channels=8,
        adapter_hidden=16,
        decoder=DecoderConfig(base_channels=16, channel_mult=[1, 2, 2], layers_per_block=1, norm_groups=8),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def images(batch: int = 2, size: int = IMAGE, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # No test may reach the network; offline mode also makes a missing hub id fail at once.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def tokenizer() -> AlignTokTokenizer:
    torch.manual_seed(0)
    return AlignTokTokenizer.from_config(tiny_config()).eval()


# --------------------------------------------------------------------------------- tokenizer save / load


def test_save_load_round_trip_is_bitwise(tokenizer, tmp_path):
    # Perturb every weight so that nothing could come out right from a fresh initialisation.
    with torch.no_grad():
        for p in tokenizer.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    tokenizer.set_latent_stats(torch.linspace(-1, 1, 8), torch.linspace(0.5, 2, 8))
    x = images()
    with torch.no_grad():
        z, recon = tokenizer.encode(x), tokenizer.decode(tokenizer.encode(x))
    target = tmp_path / "tok"
    tokenizer.save_pretrained(target, card_extra={"rFID": 0.2612, "step": 1000})
    tokenizer.save_pretrained(target, card_extra={"rFID": 0.2612, "step": 1000})  # replacing works too

    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary directories left
    assert {p.name for p in target.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    loaded = AlignTokTokenizer.from_pretrained(target)
    assert not loaded.training
    with torch.no_grad():
        z2 = loaded.encode(x)
        assert torch.equal(z2, z)
        assert torch.equal(loaded.decode(z2), recon)
    assert loaded.config == tokenizer.config
    assert torch.equal(loaded.normalize_latents(z), tokenizer.normalize_latents(z))
    card = (target / "README.md").read_text()
    assert "8x64x64" in card and "rFID | 0.2612" in card and "from_pretrained" in card
    document = json.loads((target / "config.json").read_text())
    assert document["encoder"]["kind"] == "dinov2" and document["encoder"]["hf_config"]["hidden_size"] == 32


def test_from_pretrained_errors_are_one_line(tmp_path):
    for name, needle in [
        ("./no/such/dir", "does not exist"),
        ("nobody/no-such-tokenizer", "hf download nobody/no-such-tokenizer"),
    ]:
        with pytest.raises(TokenizerNotFoundError) as err:
            AlignTokTokenizer.from_pretrained(name)
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TokenizerNotFoundError, match="not a saved aligntok tokenizer"):
        AlignTokTokenizer.from_pretrained(tmp_path)


def test_output_shapes_and_features(tokenizer):
    x = images(batch=3, size=IMAGE)
    recon, z = tokenizer(x)
    assert z.shape == (3, 8, IMAGE // STRIDE, IMAGE // STRIDE) and recon.shape == x.shape
    pre, post = tokenizer.features(x)
    assert pre.shape == (3, 32, 4, 4) and torch.equal(post, z)
    assert torch.equal(tokenizer.adapter(pre), post)
    # Non-square images work too.
    assert tokenizer.encode(images(1, 16)[..., :8]).shape == (1, 8, 4, 2)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (torch.zeros(3, 16, 16), "shape (B, 3, H, W)"),
        (torch.zeros(1, 4, 16, 16), "3 channels"),
        (torch.zeros(1, 3, 18, 16), "multiple of the stride 4"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "float tensor"),
        (torch.full((1, 3, 16, 16), 255.0), "scale images to [-1, 1]"),
        (torch.full((1, 3, 16, 16), float("nan")), "scale images to [-1, 1]"),
    ],
)
def test_wrong_input_is_a_one_line_error(tokenizer, bad, needle):
    with pytest.raises(ValueError) as err:
        tokenizer.encode(bad)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_range_error_names_observed_range(tokenizer):
    with pytest.raises(ValueError, match=r"span \[0, 255\]"):
        tokenizer.encode(torch.linspace(0, 255, 3 * 16 * 16).view(1, 3, 16, 16))
    tokenizer.encode(images() * 1.4)  # slightly outside [-1, 1] is tolerated


def test_latent_normalisation(tokenizer):
    z = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match="latent statistics are not set"):
        tokenizer.normalize_latents(z)
    mean, std = torch.arange(8.0), torch.arange(1.0, 9.0)
    tokenizer.set_latent_stats(mean, std)
    normalized = tokenizer.normalize_latents(z)
    assert torch.allclose(normalized[:, 3], (z[:, 3] - 3.0) / 4.0)
    assert torch.allclose(tokenizer.denormalize_latents(normalized), z, atol=1e-6)
    with pytest.raises(ValueError, match="expected latent_channels=8"):
        tokenizer.set_latent_stats([0.0] * 4, [1.0] * 4)
    with pytest.raises(ValueError, match="positive"):
        tokenizer.set_latent_stats([0.0] * 8, [0.0] * 8)


def test_tokenizer_config_errors_are_one_line():
    cfg = load_config(TokenizerConfig, overrides=["latent_channels=64", "decoder.channel_mult=[1,2]"])
    assert cfg.latent_channels == 64 and cfg.decoder.stride == 2
    for override, needle in [
        ("encoder_kind=clip", "encoder_kind='clip'"),
        ("decoder.norm_groups=5", "norm_groups=5"),
        ("latent_mean=[0.0]", "set together"),
        ("random_encoder.num_heads=3", "not divisible"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(TokenizerConfig, overrides=[override])
        assert needle in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ foundation encoders


def _save_encoder(tmp_path, kind: str):
    """A tiny random model of ``kind`` saved by transformers, and the model class that reads it back."""
    torch.manual_seed(0)
    if kind == "dinov2":
        model = Dinov2Model(Dinov2Config(patch_size=4, image_size=32, **TINY))
    elif kind == "dinov2-with-registers":
        model = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(patch_size=4, image_size=32, num_register_tokens=3, **TINY)
        )
    elif kind == "mae":
        model = ViTMAEModel(ViTMAEConfig(patch_size=4, image_size=32, **TINY))
    elif kind == "siglip2":
        model = Siglip2VisionModel(Siglip2VisionConfig(patch_size=4, num_patches=16, **TINY))
    else:  # a full SigLIP2 (text + vision) checkpoint, as published on the hub
        model = Siglip2Model(
            Siglip2Config(
                vision_config=dict(patch_size=4, num_patches=16, **TINY), text_config=dict(vocab_size=64, **TINY)
            )
        )
    path = tmp_path / kind
    model.save_pretrained(path)
    return path, model.eval()


def _reference_patch_tokens(kind: str, model, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens computed straight from the transformers model, independently of FoundationEncoder."""
    h, w = grid
    resized = F.interpolate(x, size=(h * 4, w * 4), mode="bilinear", antialias=True, align_corners=False)
    unit = (resized + 1) / 2
    if kind.startswith("siglip2"):
        pixels = (unit - 0.5) / 0.5
        patches = torch.stack([convert_image_to_patches(image, 4) for image in pixels])
        vision = model.vision_model if kind == "siglip2-full" else model
        out = vision(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(x.shape[0], h * w, dtype=torch.long),
            spatial_shapes=torch.tensor([[h, w]] * x.shape[0]),
        )
        tokens = out.last_hidden_state
    else:
        pixels = (unit - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor((0.229, 0.224, 0.225)).view(
            1, 3, 1, 1
        )
        if kind == "mae":
            model.config.mask_ratio = 0.0
            out = model(pixel_values=pixels, interpolate_pos_encoding=True)  # random shuffle ...
            shuffled = out.last_hidden_state[:, 1:]
            index = out.ids_restore.unsqueeze(-1).expand_as(shuffled)
            tokens = torch.gather(shuffled, 1, index)  # ... undone with MAE's own restore indices
        else:
            tokens = model(pixel_values=pixels).last_hidden_state
            tokens = tokens[:, 1 + getattr(model.config, "num_register_tokens", 0) :]
    return tokens.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("kind", ["dinov2", "dinov2-with-registers", "mae", "siglip2", "siglip2-full"])
def test_encoder_saved_by_transformers_loads_like_a_hub_id(tmp_path, kind):
    path, model = _save_encoder(tmp_path, kind)
    encoder = load_encoder(str(path), stride=STRIDE).eval()
    assert encoder.kind == kind.removesuffix("-full") and encoder.hidden_size == 32 and encoder.patch_size == 4
    x = images(batch=2, size=24)[..., :20]  # 24x20 px -> a 6x5 grid, 24x20 px encoder input
    with torch.no_grad():
        out = encoder(x)
        expected = _reference_patch_tokens(kind, model, x, (6, 5))
    assert out.shape == (2, 32, 6, 5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # Rebuilding from the saved transformers config gives the same architecture.
    rebuilt = build_encoder_from_config(encoder.kind, encoder.hf_config.to_dict(), stride=STRIDE)
    shapes = {k: v.shape for k, v in encoder.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    # Only weights that receive gradients remain (DDP rejects unused parameters).
    encoder.train()
    encoder(x).square().mean().backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)


def test_encoder_resizes_to_patch_grid(tmp_path):
    path, _ = _save_encoder(tmp_path, "dinov2")
    encoder = load_encoder(path, stride=16)  # a 64 px image -> 4x4 grid -> 16 px input (patch 4)
    seen = []
    encoder.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["pixel_values"].shape), with_kwargs=True
    )
    assert encoder(images(1, 64)).shape == (1, 32, 4, 4)
    assert seen == [torch.Size([1, 3, 16, 16])]


def test_encoder_normalisation_comes_from_preprocessor_config(tmp_path):
    path, _ = _save_encoder(tmp_path, "dinov2")
    assert torch.allclose(load_encoder(path).pixel_mean.flatten(), torch.tensor(IMAGENET_MEAN))
    (path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]})
    )
    encoder = load_encoder(path)
    assert encoder.pixel_mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert encoder.pixel_std.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    assert "pixel_mean" in encoder.state_dict()  # travels with the tokenizer's weights


def test_encoder_errors(tmp_path):
    with pytest.raises(EncoderNotFoundError) as err:
        load_encoder("nobody/no-such-encoder")
    message = str(err.value)
    assert "'nobody/no-such-encoder'" in message and "hf download nobody/no-such-encoder" in message
    assert "model.encoder" in message and "\n" not in message
    with pytest.raises(EncoderNotFoundError, match="does not exist"):
        load_encoder(str(tmp_path / "missing" / "dir"))
    path, _ = _save_encoder(tmp_path, "dinov2")
    with pytest.raises(ValueError, match="not a mae encoder"):
        load_encoder(path, kind="mae")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=r"lacks \d+ weights of a Dinov2Model \(first: encoder.layer.1"):
        load_encoder(path)
    (path / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ValueError) as err:
        load_encoder(path)
    assert "does not load as a Dinov2Model" in str(err.value) and "\n" not in str(err.value)


def test_tokenizer_with_a_saved_encoder_round_trips(tmp_path):
    path, _ = _save_encoder(tmp_path, "dinov2-with-registers")
    tok = AlignTokTokenizer.from_config(tiny_config(encoder=str(path))).eval()
    tok.save_pretrained(tmp_path / "tok")
    path.joinpath("model.safetensors").unlink()  # loading must not need the original encoder files
    loaded = AlignTokTokenizer.from_pretrained(tmp_path / "tok")
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), tok.encode(x))


# ------------------------------------------------------------------------------ adapter, decoder, critic


def test_adapter_is_a_per_token_mlp():
    torch.manual_seed(0)
    adapter = Adapter(6, 10, 3)
    features = torch.randn(2, 6, 3, 4)
    out = adapter(features)
    token = features[1, :, 2, 3]
    expected = adapter.net[2](F.gelu(adapter.net[0](token)))
    assert out.shape == (2, 3, 3, 4)
    torch.testing.assert_close(out[1, :, 2, 3], expected)
    with pytest.raises(ValueError, match=r"\(B, 6, h, w\)"):
        adapter(torch.randn(2, 5, 3, 3))


def test_f16d32_decoder_size_and_shape():
    decoder = LatentDecoder(32, DecoderConfig())
    count = sum(p.numel() for p in decoder.parameters())
    assert abs(count - 42e6) / 42e6 < 0.03, count
    assert decoder.stride == 16
    assert sum(type(b).__name__ == "AttnUpDecoderBlock2D" for b in decoder.net.up_blocks) == 1
    assert decoder.last_layer is decoder.net.conv_out.weight
    with torch.no_grad():
        assert decoder(torch.randn(1, 32, 1, 2)).shape == (1, 3, 16, 32)
    with pytest.raises(ValueError, match=r"\(B, 32, h, w\)"):
        decoder(torch.randn(1, 16, 2, 2))


def test_decoder_without_attention_is_smaller():
    with_attention = LatentDecoder(4, DecoderConfig(base_channels=32, channel_mult=[1, 2]))
    without = LatentDecoder(4, DecoderConfig(base_channels=32, channel_mult=[1, 2], attention_at_lowest=False))
    attention = 3 * (4 * 64 * 64 + 4 * 64 + 2 * 64)  # 3 blocks of q, k, v, out projections + GroupNorm
    assert (
        sum(p.numel() for p in with_attention.parameters()) - sum(p.numel() for p in without.parameters()) == attention
    )


def test_paper_configuration_parameter_counts():
    # DINOv2-L/14 built from its config on the meta device: no download, no memory.
    with torch.device("meta"):
        dinov2_large = Dinov2Model(
            Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=518)
        )
    encoder_params = sum(p.numel() for p in dinov2_large.parameters())
    assert 300e6 < encoder_params < 310e6, encoder_params
    adapter = Adapter(1024, TokenizerConfig().adapter_hidden, 32)
    assert sum(p.numel() for p in adapter.parameters()) == 1024 * 1024 + 1024 + 1024 * 32 + 32


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_patch_discriminator(norm):
    torch.manual_seed(0)
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=8, norm=norm, norm_groups=4))
    norm_type = {"group": torch.nn.GroupNorm, "batch": torch.nn.BatchNorm2d, "none": torch.nn.Identity}[norm]
    assert sum(isinstance(m, norm_type) for m in disc.modules()) == 3
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    assert disc(images(2, 64)).shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
    assert disc.min_input_size() == 24
    with pytest.raises(ValueError, match="too small"):
        disc(images(1, 16))


def test_discriminator_config_errors():
    with pytest.raises(ConfigError, match="norm='layer'"):
        DiscriminatorConfig(norm="layer").validate()
    with pytest.raises(ConfigError, match="norm_groups=32 does not divide base_channels=8"):
        DiscriminatorConfig(base_channels=8).validate()


def test_loading_an_encoder_logs_no_warnings(tmp_path):
    # Expected unused weights and transformers' tensor-parallel check (a plan-less model's every layer
    # "not sharded") are noise to a user loading an encoder; real problems raise instead.
    import logging

    path, _ = _save_encoder(tmp_path, "dinov2")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    library_logger = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root
    library_logger.addHandler(handler)
    try:
        load_encoder(str(path))
    finally:
        library_logger.removeHandler(handler)
    assert [r.getMessage()[:80] for r in records] == []
