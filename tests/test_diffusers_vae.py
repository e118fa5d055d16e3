"""A diffusers AutoencoderKL (directory or hub id, offline) is a tokenizer in every command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from aligntok.cli import main
from aligntok.eval.provenance import sha256_file
from aligntok.models.diffusers_vae import DiffusersVAETokenizer, config_latent_stats
from aligntok.models.tokenizer import (
    AlignTokTokenizer,
    LatentTokenizer,
    TokenizerNotFoundError,
)

DIT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dit" / "tiny.yaml"


def tiny_vae(seed: int = 0, **config) -> AutoencoderKL:
    """Stride 2, 4 latent channels: an SD-style VAE shrunk to a few thousand weights."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        **config,
    ).eval()


def images(n: int = 2, side: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_a_diffusers_directory_loads_as_a_tokenizer_with_the_vaes_encode_and_decode(tmp_path):
    vae = tiny_vae(scaling_factor=0.5, shift_factor=0.1)
    vae.save_pretrained(tmp_path / "vae")
    tok = AlignTokTokenizer.from_pretrained(tmp_path / "vae")
    assert isinstance(tok, DiffusersVAETokenizer)
    assert (tok.stride, tok.latent_channels) == (2, 4)
    x = images()
    with torch.no_grad():
        z = tok.encode(x)
        torch.testing.assert_close(z, vae.encode(x).latent_dist.mean)
        assert z.shape == (2, 4, 8, 8)
        torch.testing.assert_close(tok.decode(z), vae.decode(z).sample)
        # The config's constants, as diffusers pipelines apply them: (z - shift) * scale.
        torch.testing.assert_close(tok.normalize_latents(z), (z - 0.1) * 0.5)
        torch.testing.assert_close(tok.denormalize_latents(tok.normalize_latents(z)), z)
    with pytest.raises(ValueError, match="multiple of the stride 2"):
        tok.encode(images(side=15))


def test_per_channel_config_statistics_follow_the_diffusers_convention():
    mean, std = config_latent_stats({"latent_channels": 2, "scaling_factor": 0.5, "latents_mean": [1.0, -1.0],
                                     "latents_std": [2.0, 4.0]})
    assert (mean, std) == ([1.0, -1.0], [4.0, 8.0])  # (z - m) * scale / s == (z - m) / (s / scale)
    assert config_latent_stats({"latent_channels": 2, "scaling_factor": 0.25, "shift_factor": None}) == ([0.0, 0.0], [4.0, 4.0])


def test_posterior_samples_on_request_and_an_aligntok_copy_round_trips(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae")
    tok = DiffusersVAETokenizer.from_diffusers(tmp_path / "vae", posterior="sample")
    x = images()
    with torch.no_grad():
        torch.manual_seed(3)
        first = tok.encode(x)
        torch.manual_seed(3)
        torch.testing.assert_close(tok.encode(x), first)
        assert not torch.allclose(first, tok.vae.encode(x).latent_dist.mean)
    tok.set_latent_stats([0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    tok.save_pretrained(tmp_path / "copy")
    document = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert document["method"] == "diffusers-vae" and document["vae"]["config"]["latent_channels"] == 4
    loaded = LatentTokenizer.from_pretrained(tmp_path / "copy")
    assert isinstance(loaded, DiffusersVAETokenizer) and loaded.config == tok.config
    for key, value in tok.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)  # the same saved bytes


def test_pipelines_and_other_diffusers_models_are_one_line_errors(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(TokenizerNotFoundError, match="is a diffusers pipeline: name its VAE"):
        AlignTokTokenizer.from_pretrained(tmp_path / "pipe")
    assert isinstance(AlignTokTokenizer.from_pretrained(tmp_path / "pipe" / "vae"), DiffusersVAETokenizer)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(TokenizerNotFoundError, match="is a diffusers UNet2DConditionModel; only AutoencoderKL"):
        AlignTokTokenizer.from_pretrained(tmp_path / "unet")


def test_cache_latents_train_dit_and_sample_through_the_cli(tmp_path, capsys):
    vae = tiny_vae(scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    cache = tmp_path / "cache"
    common = ["--data", "builtin:shapes", "--out", str(cache), "--resolution", "8", "--builtin-size", "24",
              "--batch-size", "12", "--num-workers", "0"]
    assert main(["cache-latents", "--tokenizer", str(tmp_path / "vae"), *common]) == 0
    assert f"recorded in {cache / 'tokenizer'}" in capsys.readouterr().out
    meta = json.loads((cache / "cache.json").read_text())
    copy = AlignTokTokenizer.from_pretrained(cache / "tokenizer")  # the aligntok copy holds the dataset statistics
    assert isinstance(copy, DiffusersVAETokenizer) and copy.config.latent_mean == pytest.approx(meta["latent_mean"])
    shard = load_file(str(cache / "shard-00000.safetensors"))
    assert shard["latents"].shape == (24, 4, 4, 4)
    assert not (tmp_path / "vae" / "model.safetensors").exists()  # the diffusers directory is left alone
    # A re-run resumes; the same cache with another VAE is refused instead of mixing two tokenizers.
    assert main(["cache-latents", "--tokenizer", str(tmp_path / "vae"), *common]) == 0
    tiny_vae(seed=1).save_pretrained(tmp_path / "other")
    capsys.readouterr()
    assert main(["cache-latents", "--tokenizer", str(tmp_path / "other"), *common]) == 2
    assert "tokenizer_source" in capsys.readouterr().err

    dit_options = ["model.input_size=4", "model.in_channels=4", "model.hidden_size=32", "model.depth=1",
                   "model.num_heads=2", "train.steps=2", "train.batch_size=4", "train.ckpt_every=2"]
    assert main(["train-dit", str(DIT_CONFIG), "--out", str(tmp_path / "run"), f"data.cache={cache}", *dit_options]) == 0
    out = tmp_path / "samples"
    assert main(["sample", "--dit", str(tmp_path / "run" / "model"), "--tokenizer", str(cache / "tokenizer"),
                 "--num", "3", "--steps", "2", "--out", str(out)]) == 0
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (3, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
    settings = json.loads((out / "sampling.json").read_text())
    assert settings["latent_mean"] == pytest.approx(meta["latent_mean"])

    # On-the-fly encoding with the diffusers directory itself normalises with the config's constants.
    fly = ["data.cache=", "data.train=builtin:shapes", f"data.tokenizer={tmp_path / 'vae'}", "data.resolution=8",
           "data.builtin_size=8", "data.num_workers=0"]
    assert main(["train-dit", str(DIT_CONFIG), "--out", str(tmp_path / "fly"), *fly, *dit_options]) == 0
    assert main(["sample", "--dit", str(tmp_path / "fly" / "model"), "--tokenizer", str(tmp_path / "vae"),
                 "--num", "2", "--steps", "2", "--out", str(tmp_path / "fly_samples")]) == 0
    settings = json.loads((tmp_path / "fly_samples" / "sampling.json").read_text())
    assert settings["latent_std"] == pytest.approx([2.0] * 4)  # 1 / scaling_factor


def test_evaluate_recon_measures_a_diffusers_vae(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae")
    out = tmp_path / "recon.json"
    assert main(["evaluate", "recon", "--tokenizer", str(tmp_path / "vae"), "--data", "builtin:shapes", "--num", "4",
                 "--resolution", "16", "--batch-size", "4", "--num-workers", "0", "--no-rfid", "--lpips", "none",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 4 and 0 < result["psnr"] < 60
    tokenizer = result["provenance"]["feature_networks"][0]
    assert tokenizer["name"] == "diffusers-vae-tokenizer" and tokenizer["stride"] == 2
    assert tokenizer["weights_sha256"] == sha256_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
