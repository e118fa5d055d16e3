"""The FLUX-VAE baseline: FLUX.1's VAE shape, trained from scratch by train-tokenizer, usable everywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from aligntok.cli import main
from aligntok.config import ConfigError, load_config
from aligntok.data.latent_dataset import LatentDataset
from aligntok.diffusion.t2i_training import T2ITrainConfig, train_t2i
from aligntok.models.diffusers_vae import DiffusersVAETokenizer, FluxVAEConfig
from aligntok.models.text import build_tiny_text_encoders
from aligntok.models.tokenizer import LatentTokenizer
from aligntok.models.word_tokenizer import caption_words
from aligntok.standins.text import builtin_captions
from aligntok.training.stages import (
    METHOD_STAGES,
    TokenizerTrainConfig,
    build_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tokenizer" / "fluxvae_tiny.yaml"
FULL = ROOT / "configs" / "tokenizer" / "fluxvae_f8c16.yaml"
# FLUX.1-schnell's vae/config.json (the architecture fields), pinned.
FLUX1_VAE = {
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 16,
    "norm_num_groups": 32, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
    "use_post_quant_conv": False, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "mid_block_add_attention": True,
}
# Tiny enough to train in a second: f8 (four levels), 16 channels.
FAST = ["flux_vae.block_out_channels=[8,8,8,8]", "flux_vae.norm_num_groups=4", "data.num_workers=0",
        "data.builtin_size=32", "loss.gan_start=2", "stage1.train.steps=3", "stage1.train.batch_size=4",
        "stage1.train.ckpt_every=3", "stage1.train.log_every=1"]


def test_the_default_architecture_is_flux1s_vae():
    cfg = FluxVAEConfig()
    built = AutoencoderKL(**cfg.diffusers_config()).config
    for key, value in FLUX1_VAE.items():
        assert tuple(built[key]) == value if isinstance(value, tuple) else built[key] == value, key
    assert cfg.stride == 8
    shipped = load_config(TokenizerTrainConfig, FULL)
    assert shipped.method == "flux-vae" and shipped.flux_vae == cfg


def test_shipped_configs_share_the_baselines_budget():
    tiny = load_config(TokenizerTrainConfig, TINY)
    vae = load_config(TokenizerTrainConfig, ROOT / "configs" / "tokenizer" / "vae_tiny.yaml")
    assert (tiny.stage1.train.steps, tiny.stage1.train.batch_size) == (vae.stage1.train.steps, vae.stage1.train.batch_size)
    assert (tiny.data, tiny.loss, tiny.kl) == (vae.data, vae.loss, vae.kl)
    tok = build_tokenizer(tiny)
    assert isinstance(tok, DiffusersVAETokenizer) and (tok.stride, tok.latent_channels) == (8, 16)
    assert tok.config.latent_mean is None  # a fresh VAE's statistics are measured, not FLUX's constants
    full = load_config(TokenizerTrainConfig, FULL)
    imagenet_vae = load_config(TokenizerTrainConfig, ROOT / "configs" / "tokenizer" / "vae_f16d32.yaml")
    assert full.stage1 == imagenet_vae.stage1 and full.loss == imagenet_vae.loss and full.kl == imagenet_vae.kl


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="multiple of the tokenizer stride 8"):
        load_config(TokenizerTrainConfig, TINY, ["data.resolution=36"])
    with pytest.raises(ConfigError, match="norm_num_groups"):
        load_config(TokenizerTrainConfig, TINY, ["flux_vae.norm_num_groups=5"])
    assert set(METHOD_STAGES["flux-vae"]) == {1} and METHOD_STAGES["flux-vae"][1].kl_loss


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny FLUX-VAE trained through the CLI (3 steps at 32 px), and a text encoder."""
    root = tmp_path_factory.mktemp("fluxvae")
    assert main(["train-tokenizer", str(TINY), "--out", str(root / "run"), "data.resolution=32", *FAST]) == 0
    build_tiny_text_encoders(root / "text", caption_words(builtin_captions(200)), width=16, layers=1, heads=2)
    return root


def test_train_tokenizer_trains_the_whole_vae_with_its_kl_term(trained):
    records = [json.loads(line) for line in (trained / "run" / "train" / "stage1" / "log.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert all(r["generator/kl"] > 0 and "generator/kl_total" in r for r in records), records[0].keys()
    tok = LatentTokenizer.from_pretrained(trained / "run" / "stage1")
    assert isinstance(tok, DiffusersVAETokenizer)
    torch.manual_seed(0)  # the stage's seed: the weights it started from
    fresh = build_tokenizer(load_config(TokenizerTrainConfig, TINY, ["data.resolution=32", *FAST]))
    trained_state, fresh_state = tok.state_dict(), fresh.state_dict()
    assert trained_state.keys() == fresh_state.keys()
    for part in ("vae.encoder.conv_in.weight", "vae.decoder.conv_out.weight"):  # encoder and decoder both trained
        assert not torch.equal(trained_state[part], fresh_state[part]), part
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert tok.encode(x).shape == (2, 16, 4, 4) and tok(x)[0].shape == x.shape


def test_round_trip_through_cache_latents_and_train_t2i_with_2x2_packing(trained, tmp_path):
    tok = shutil.copytree(trained / "run" / "stage1", tmp_path / "tok")  # cache-latents records statistics in it
    cache = tmp_path / "cache"
    assert main(["cache-latents", "--tokenizer", str(tok), "--data", "builtin:scenes",
                 "--resolution", "32", "--builtin-size", "8", "--batch-size", "4", "--num-workers", "0",
                 "--captions", "--out", str(cache)]) == 0
    data = LatentDataset(cache)
    assert data[0]["latent"].shape == (16, 4, 4) and data.has_captions
    assert LatentTokenizer.from_pretrained(tok).config.latent_mean == pytest.approx(data.metadata["latent_mean"])
    cfg = load_config(T2ITrainConfig, ROOT / "configs" / "t2i" / "tiny.yaml", [
        f"data.tokenizer={tok}", "data.build_tokenizer=null", "data.train=null", f"data.cache={cache}",
        f"text.encoder={trained / 'text' / 't5'}", "data.resolution=32", "train.steps=2", "train.batch_size=4", "train.ckpt_every=2",
        "train.log_every=1", "validation.every=0", "optim.warmup_steps=1",
    ])
    model_dir = train_t2i(cfg, tmp_path / "t2i")
    info = json.loads((model_dir / "aligntok_t2i.json").read_text())
    assert info["config"]["pack"] == 2 and info["config"]["in_channels"] == 16
    assert info["latent_mean"] == pytest.approx(data.metadata["latent_mean"])
    out = tmp_path / "samples"
    assert main(["sample-t2i", "--model", str(model_dir), "--tokenizer", str(tok),
                 "--prompt", "a red circle", "--steps", "2", "--out", str(out)]) == 0
    assert any(out.rglob("*.png"))
