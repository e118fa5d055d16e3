"""`aligntok sample`: balanced labels, per-sample seeds, ADM .npz + grid + settings, 1 vs 2 processes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from aligntok.cli import main
from aligntok.diffusion.samplers import SamplerConfig
from aligntok.diffusion.sampling import (
    SampleConfig,
    sample_generator,
    sample_labels,
    sample_to_directory,
)
from aligntok.models.lightningdit import LightningDiT, LightningDiTConfig
from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny tokenizer with latent statistics (stride 4, 4 channels) and a random DiT for its 4x4 latents."""
    root = tmp_path_factory.mktemp("sample")
    cfg = TokenizerConfig(encoder="random", latent_channels=4, adapter_hidden=8)
    cfg.decoder.base_channels, cfg.decoder.channel_mult, cfg.decoder.norm_groups = 8, [1, 2, 2], 4
    torch.manual_seed(0)
    tok = AlignTokTokenizer.from_config(cfg)
    tok.save_pretrained(root / "raw_tok")
    tok.set_latent_stats([0.1, -0.2, 0.3, 0.0], [0.5, 1.0, 2.0, 1.5])
    tok.save_pretrained(root / "tok")
    dit = LightningDiT(LightningDiTConfig(input_size=4, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=NUM_CLASSES))
    with torch.no_grad():  # the reference init zeroes the output layer: give the model something to say
        for param in dit.parameters():
            param.add_(0.05 * torch.randn_like(param))
    dit.save_pretrained(root / "dit")
    return root


def _read(out: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with np.load(out / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    return images, labels, json.loads((out / "sampling.json").read_text())


def test_labels_are_class_balanced_or_the_given_ones_repeated():
    assert sample_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert sample_labels(5, 10, [4, 2]).tolist() == [4, 2, 4, 2, 4]
    with pytest.raises(ValueError, match=r"labels \[10\] are outside the model's classes 0..9"):
        sample_labels(2, 10, [1, 10])


def test_each_sample_has_its_own_seed():
    draw = lambda seed, i: torch.randn(4, generator=sample_generator(seed, i))
    assert torch.equal(draw(0, 3), draw(0, 3))
    assert not torch.equal(draw(0, 3), draw(0, 4)) and not torch.equal(draw(0, 3), draw(1, 3))


def test_sampling_writes_the_adm_npz_a_grid_and_every_setting(models):
    out = models / "out"
    sampler = SamplerConfig(num_steps=3, cfg_scale=3.0, cfg_interval_start=0.2, timestep_shift=0.5)
    result = sample_to_directory(models / "dit", models / "tok", out, SampleConfig(num=5, batch_size=2, sampler=sampler))
    images, labels, settings = _read(out)
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 0, 1]
    assert len({image.tobytes() for image in images}) == 5  # five different samples
    grid = np.asarray(Image.open(result.grid))
    assert grid.shape == (2 + 2 * 18, 2 + 3 * 18, 3)  # 3 columns, 2 rows of 16 px with 2 px gaps
    assert settings["sampler"] == {**vars(SamplerConfig()), **vars(sampler)}
    assert settings["num"] == 5 and settings["seed"] == 0 and settings["batch_size"] == 2
    assert settings["image_size"] == [16, 16] and settings["latent_mean"] == pytest.approx([0.1, -0.2, 0.3, 0.0])
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "samples.npz", "sampling.json"]


class _Killed(Exception):
    """Raised mid-run, as a kill would stop it."""


def test_an_interrupted_run_resumes_making_only_the_missing_batches_and_equals_a_straight_one(models, monkeypatch):
    from aligntok.diffusion import sampling

    config = SampleConfig(num=5, batch_size=2, seed=3, sampler=SamplerConfig(num_steps=2))
    straight = models / "straight"
    sample_to_directory(models / "dit", models / "tok", straight, config)
    real_decode, calls = sampling.decode_samples, []

    def counted(*args, **kwargs):
        calls.append(list(args[3]))
        if len(calls) == 2 and kill:
            raise _Killed("killed while sampling the second batch")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(sampling, "decode_samples", counted)
    resumed = models / "resumed"
    kill = True
    with pytest.raises(_Killed):
        sample_to_directory(models / "dit", models / "tok", resumed, config)
    assert not (resumed / "samples.npz").exists()
    calls.clear()
    kill = False
    sample_to_directory(models / "dit", models / "tok", resumed, config)
    assert calls == [[2, 3], [4]]  # the first batch was kept from the interrupted run
    assert np.array_equal(_read(straight)[0], _read(resumed)[0])
    assert sorted(p.name for p in resumed.iterdir()) == ["grid.png", "samples.npz", "sampling.json"]

    # Other settings after an interrupted run: none of its batches is reused.
    calls.clear()
    kill = True
    with pytest.raises(_Killed):
        sample_to_directory(models / "dit", models / "tok", models / "reseeded", config)
    calls.clear()
    kill = False
    sample_to_directory(models / "dit", models / "tok", models / "reseeded", dataclasses.replace(config, seed=4))
    assert calls == [[0, 1], [2, 3], [4]]


def test_latents_are_denormalised_with_the_tokenizers_statistics_before_decoding(models):
    """With zero steps of motion (a zero-output model) a sample is its noise, de-normalised, decoded."""
    dit = LightningDiT(LightningDiTConfig(input_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=NUM_CLASSES))
    dit.save_pretrained(models / "zero_dit")  # reference init: zero output, so x stays the noise
    out = models / "zero"
    sample_to_directory(models / "zero_dit", models / "tok", out,
                        SampleConfig(num=2, batch_size=2, sampler=SamplerConfig(num_steps=2)))
    tok = AlignTokTokenizer.from_pretrained(models / "tok")
    noise = torch.stack([torch.randn(4, 4, 4, generator=sample_generator(0, i)) for i in range(2)])
    with torch.no_grad():
        expected = ((tok.decode(tok.denormalize_latents(noise)) * 127.5 + 127.5).round().clamp(0, 255)).to(torch.uint8)
    images, _, _ = _read(out)
    assert np.array_equal(images, expected.permute(0, 2, 3, 1).numpy())


def test_latents_are_denormalised_with_the_statistics_the_dit_was_trained_with(models, caplog):
    """The tokenizer's statistics were rewritten after training (cache-latents run again): the DiT's win."""
    dit = LightningDiT(LightningDiTConfig(input_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=NUM_CLASSES))
    dit.latent_stats = {"mean": [1.0, 2.0, -1.0, 0.5], "std": [0.2, 0.3, 0.4, 0.25]}  # not the tokenizer's
    dit.save_pretrained(models / "zero_dit_stats")
    out = models / "zero_stats"
    with caplog.at_level("WARNING"):
        sample_to_directory(models / "zero_dit_stats", models / "tok", out,
                            SampleConfig(num=2, batch_size=2, sampler=SamplerConfig(num_steps=2)))
    assert "differ from those the DiT was trained with" in caplog.text
    tok = AlignTokTokenizer.from_pretrained(models / "tok")
    noise = torch.stack([torch.randn(4, 4, 4, generator=sample_generator(0, i)) for i in range(2)])
    mean, std = torch.tensor(dit.latent_stats["mean"])[:, None, None], torch.tensor(dit.latent_stats["std"])[:, None, None]
    with torch.no_grad():
        expected = ((tok.decode(noise * std + mean) * 127.5 + 127.5).round().clamp(0, 255)).to(torch.uint8)
    images, _, settings = _read(out)
    assert np.array_equal(images, expected.permute(0, 2, 3, 1).numpy())
    assert settings["latent_mean"] == dit.latent_stats["mean"] and settings["latent_stats_from"] == "dit"
    # A DiT with statistics needs none from the tokenizer; bad recorded statistics are refused in one line.
    sample_to_directory(models / "zero_dit_stats", models / "raw_tok", models / "zero_raw",
                        SampleConfig(num=1, sampler=SamplerConfig(num_steps=1)))
    document = json.loads((models / "zero_dit_stats" / "config.json").read_text())
    document["latent_stats"]["std"] = [1.0, 1.0]
    (models / "zero_dit_stats" / "config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"config\.json: latent_mean/latent_std have 4/2 entries"):
        LightningDiT.from_pretrained(models / "zero_dit_stats")


def test_cli_sampler_options_default_to_the_settings_recorded_with_the_dit(models):
    dit = LightningDiT.from_pretrained(models / "dit")
    dit.sampler_settings = {"num_steps": 2, "cfg_scale": 3.0, "cfg_channels": 2, "cfg_interval_start": 0.2}
    dit.save_pretrained(models / "dit_recorded")
    common = ["sample", "--dit", str(models / "dit_recorded"), "--tokenizer", str(models / "tok"), "--num", "2"]
    assert main([*common, "--out", str(models / "recorded"), "--cfg-scale", "2.5"]) == 0
    sampler = _read(models / "recorded")[2]["sampler"]
    assert sampler == {**vars(SamplerConfig()), "num_steps": 2, "cfg_scale": 2.5, "cfg_channels": 2, "cfg_interval_start": 0.2}
    assert main([*common, "--out", str(models / "all"), "--cfg-channels", "all"]) == 0
    assert _read(models / "all")[2]["sampler"]["cfg_channels"] is None
    assert main([*common, "--out", str(models / "one"), "--cfg-channels", "1"]) == 0
    assert _read(models / "one")[2]["sampler"]["cfg_channels"] == 1


def test_one_process_and_two_under_torchrun_give_bitwise_identical_samples(models):
    common = ["sample", "--dit", str(models / "dit"), "--tokenizer", str(models / "tok"), "--num", "5", "--steps", "3",
              "--cfg-scale", "2", "--batch-size", "2", "--seed", "7"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1): CPU reductions depend on threads
    try:
        assert main([*common, "--out", str(models / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "aligntok.cli", "--", *common, "--out", str(models / "two")],
                         check=False, capture_output=True, text=True, env=env, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    images_one, labels_one, settings_one = _read(models / "one")
    images_two, labels_two, settings_two = _read(models / "two")
    assert settings_one["world_size"] == 1 and settings_two["world_size"] == 2
    assert np.array_equal(labels_one, labels_two) and np.array_equal(images_one, images_two)


def test_cli_sample_with_given_labels_and_one_line_errors(models, capsys):
    out = models / "cli"
    args = ["sample", "--dit", str(models / "dit"), "--tokenizer", str(models / "tok"), "--num", "4", "--out", str(out),
            "--steps", "2", "--labels", "2,1", "--method", "heun"]
    assert main(args) == 0
    _, labels, settings = _read(out)
    assert labels.tolist() == [2, 1, 2, 1] and settings["sampler"]["method"] == "heun"
    capsys.readouterr()
    for bad, message in (
        (["--labels", "7"], "outside the model's classes 0..2"),
        (["--method", "ddim"], "method='ddim' is not one of"),
        (["--cfg-channels", "5", "--cfg-scale", "2"], "cfg_channels=5 exceeds the latent's 4 channels"),
        (["--cfg-channels", "0"], "cfg_channels=0 must be a positive number"),
        (["--tokenizer", str(models / "raw_tok")], "has no latent statistics"),
    ):
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


def test_cli_import_lightningdit_takes_the_ema_weights(tmp_path):
    config = LightningDiTConfig.from_preset("LightningDiT-S/2", input_size=2, in_channels=4, num_classes=2)
    model, ema = LightningDiT(config), LightningDiT(config)
    torch.save({"model": model.state_dict(), "ema": {f"module.{k}": v for k, v in ema.state_dict().items()}}, tmp_path / "ckpt.pt")
    assert main(["import-lightningdit", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "dit"), "--preset", "LightningDiT-S/2"]) == 0
    imported = load_file(str(tmp_path / "dit" / "model.safetensors"))
    assert all(torch.equal(imported[k], v) for k, v in ema.state_dict().items())
    assert LightningDiT.from_pretrained(tmp_path / "dit").config == config


def test_cli_import_lightningdit_infers_the_preset_and_checks_a_given_one(tmp_path, capsys):
    config = LightningDiTConfig.from_preset("LightningDiT-S/1", input_size=2, in_channels=4, num_classes=2)
    torch.save({"ema": LightningDiT(config).state_dict()}, tmp_path / "ckpt.pt")
    assert main(["import-lightningdit", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "dit")]) == 0
    assert "LightningDiT-S/1" in capsys.readouterr().out
    assert LightningDiT.from_pretrained(tmp_path / "dit").config == config
    assert main(["import-lightningdit", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "x"), "--preset", "LightningDiT-S/2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds depth=12, hidden_size=384, patch_size=1 but preset LightningDiT-S/2" in err and "\n" not in err
