"""DiT training on the engine: configs, the task's latents, the loss falls, exact resume, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aligntok.cli import main
from aligntok.config import ConfigError, load_config
from aligntok.data.latents import cache_latents
from aligntok.diffusion.samplers import SamplerConfig
from aligntok.diffusion.sampling import SampleConfig, sample_to_directory
from aligntok.diffusion.training import DiTTask, DiTTrainConfig, train_dit
from aligntok.diffusion.transport import Transport
from aligntok.models.lightningdit import LightningDiT, LightningDiTConfig
from aligntok.models.tokenizer import AlignTokTokenizer
from aligntok.training.checkpoint import latest_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "dit"
TINY = CONFIGS / "tiny.yaml"
# The shipped tiny config, shortened for a test: fewer steps, a smaller batch, a denser log.
FAST = ["train.steps=60", "train.batch_size=16", "train.log_every=5", "train.ckpt_every=30", "optim.warmup_steps=10"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("dit")
    tokenizer = tiny_tokenizer(root / "tok", 16)  # the tiny config's latent: 16 channels, 4x4 at 64 px
    cache_latents(tokenizer, "builtin:shapes", root / "cache", resolution=64, batch_size=32, shard_size=64,
                  num_workers=0, builtin_size=96, progress=False)
    return root


@pytest.fixture(scope="module")
def tiny_run(setup):
    cfg = load_config(DiTTrainConfig, TINY, [*FAST, f"data.cache={setup / 'cache'}"])
    return cfg, train_dit(cfg, setup / "run")


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["model/loss"] for line in (run_dir / "train" / "log.jsonl").read_text().splitlines()]


def test_paper_configs_reproduce_the_reference_runs():
    for name, qk_norm, steps in (("lightningdit_xl1_64ep", False, 80_000), ("lightningdit_xl1_800ep", True, 1_000_000)):
        cfg = load_config(DiTTrainConfig, CONFIGS / f"{name}.yaml")
        model = cfg.model_config()
        assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (28, 1152, 16, 1)
        assert (model.in_channels, model.input_size, model.num_classes) == (32, 16, 1000)
        assert model.use_qknorm is qk_norm and model.use_swiglu and model.use_rope and model.use_rmsnorm
        assert cfg.train.steps == steps and cfg.train.batch_size == 1024 and cfg.train.ema_decay == 0.9999
        assert cfg.optim.lr == 2e-4 and tuple(cfg.optim.betas) == (0.9, 0.95) and cfg.optim.weight_decay == 0
        assert cfg.transport.time_sampling == "lognormal" and cfg.transport.cosine_weight == 1.0
        assert cfg.train.precision == "bf16" and cfg.data.hflip
        # Sampled as the reference does: its scales with guidance on the first 3 channels, from t = 0.10.
        assert cfg.sample.cfg_channels == 3 and cfg.sample.cfg_interval_start == 0.10
        assert cfg.sample.cfg_scale == (10.0 if steps == 80_000 else 6.7) and cfg.sample.timestep_shift == 0.3


def test_a_preset_sets_the_sizes_and_contradictions_are_refused(setup):
    cfg = load_config(DiTTrainConfig, TINY, ["preset=LightningDiT-B/2", "model.hidden_size=1152", "model.depth=28", "model.num_heads=16"])
    model = cfg.model_config()  # sizes left at the defaults yield to the preset
    assert (model.depth, model.hidden_size, model.patch_size, model.in_channels) == (12, 768, 2, 16)
    with pytest.raises(ConfigError, match="model.depth=4, model.hidden_size=64, model.num_heads=4 contradicts preset=LightningDiT-B/2"):
        load_config(DiTTrainConfig, TINY, ["preset=LightningDiT-B/2"])
    with pytest.raises(ConfigError, match="preset='DiT-Huge' is not one of"):
        load_config(DiTTrainConfig, TINY, ["preset=DiT-Huge"])
    with pytest.raises(ConfigError, match="exactly one of cache"):
        load_config(DiTTrainConfig, TINY, ["data.train=builtin:shapes", "data.tokenizer=x"])
    with pytest.raises(ConfigError, match="needs tokenizer"):
        load_config(DiTTrainConfig, TINY, ["data.cache=", "data.train=builtin:shapes"])
    cfg = load_config(DiTTrainConfig, TINY, [f"data.cache={setup / 'cache'}", "model.in_channels=32"])
    with pytest.raises(ConfigError, match="set model.in_channels=16 model.input_size=4"):
        train_dit(cfg, setup / "never")


def test_random_flip_picks_the_flipped_latent_per_sample():
    model = LightningDiT(LightningDiTConfig(input_size=2, in_channels=2, hidden_size=16, depth=1, num_heads=1, use_rope=False))
    batch = {"latent": torch.zeros(64, 2, 2, 2), "latent_flip": torch.ones(64, 2, 2, 2), "label": torch.zeros(64, dtype=torch.long)}
    double = lambda z: 2 * z
    torch.manual_seed(0)
    flipped = DiTTask(model, Transport(), double, hflip=True).latents(batch)
    per_sample = flipped.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # normalised, and each sample wholly one or the other
    assert (per_sample.min(1).values == per_sample.max(1).values).all()
    assert 10 < int(per_sample[:, 0].sum() / 2) < 54
    assert DiTTask(model, Transport(), double, hflip=False).latents(batch).abs().sum() == 0


def test_the_tiny_config_loss_falls_and_its_samples_decode_to_images(setup, tiny_run):
    cfg, model_dir = tiny_run
    losses = _losses(setup / "run")
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
    model = LightningDiT.from_pretrained(model_dir)
    assert model.config == cfg.model_config()
    result = sample_to_directory(model_dir, setup / "tok", setup / "samples",
                                 SampleConfig(num=4, batch_size=4, sampler=SamplerConfig(num_steps=4, cfg_scale=2.0)))
    with np.load(result.samples) as npz:
        assert npz["arr_0"].shape == (4, 64, 64, 3) and npz["arr_0"].dtype == np.uint8


def test_recaching_the_tokenizer_does_not_change_how_a_trained_dit_is_denormalised(setup, tmp_path, caplog):
    tokenizer = tmp_path / "tok"
    shutil.copytree(setup / "tok", tokenizer)  # cache-latents rewrites the tokenizer: not the shared one
    cache_latents(tokenizer, "builtin:shapes", tmp_path / "cache", resolution=64, batch_size=32, shard_size=64,
                  num_workers=0, builtin_size=64, progress=False)
    trained_with = json.loads((tmp_path / "cache" / "cache.json").read_text())
    cfg = load_config(DiTTrainConfig, TINY, [f"data.cache={tmp_path / 'cache'}", "train.steps=2", "train.batch_size=4",
                                             "sample.cfg_channels=2", "sample.num_steps=2"])
    model_dir = train_dit(cfg, tmp_path / "run")
    model = LightningDiT.from_pretrained(model_dir)
    assert model.latent_stats == {"mean": trained_with["latent_mean"], "std": trained_with["latent_std"]}
    assert model.sampler_settings["cfg_channels"] == 2 and model.sampler_settings["num_steps"] == 2
    # Another subset re-caches the same tokenizer and rewrites its statistics (saying so).
    with caplog.at_level("WARNING"):
        cache_latents(tokenizer, "builtin:shapes", tmp_path / "cache2", resolution=64, batch_size=32, shard_size=64,
                      num_workers=0, builtin_size=16, progress=False)
    assert "replacing the latent statistics recorded in" in caplog.text
    assert AlignTokTokenizer.from_pretrained(tokenizer).config.latent_mean != trained_with["latent_mean"]
    result = sample_to_directory(model_dir, tokenizer, tmp_path / "samples", SampleConfig(num=2, batch_size=2))
    assert result.settings["latent_mean"] == trained_with["latent_mean"]
    assert result.settings["latent_std"] == trained_with["latent_std"]
    assert result.settings["sampler"]["cfg_channels"] == 2  # recorded with the model


def test_the_exported_model_holds_the_ema_weights(setup, tiny_run):
    _, model_dir = tiny_run
    exported = load_file(str(model_dir / "model.safetensors"))
    checkpoint = latest_checkpoint(setup / "run" / "train")
    ema = load_file(str(checkpoint / "ema_model.safetensors"))
    raw = load_file(str(checkpoint / "model_model.safetensors"))
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    assert any(not torch.equal(exported[k], raw[k]) for k in exported)


def test_resume_is_exact(setup):
    overrides = [*FAST, f"data.cache={setup / 'cache'}", "train.batch_size=8", "train.ckpt_every=2", "train.log_every=1"]
    straight = train_dit(load_config(DiTTrainConfig, TINY, [*overrides, "train.steps=4"]), setup / "straight")
    train_dit(load_config(DiTTrainConfig, TINY, [*overrides, "train.steps=2"]), setup / "resumed")
    resumed = train_dit(load_config(DiTTrainConfig, TINY, [*overrides, "train.steps=4"]), setup / "resumed")
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    raw = [load_file(str(latest_checkpoint(setup / run / "train") / "model_model.safetensors")) for run in ("straight", "resumed")]
    assert all(torch.equal(raw[0][k], raw[1][k]) for k in raw[0])
    assert _losses(setup / "straight") == _losses(setup / "resumed")


def test_on_the_fly_encoding_normalises_with_the_tokenizers_statistics(setup):
    tok = AlignTokTokenizer.from_pretrained(setup / "tok")  # its statistics were recorded by cache-latents
    assert tok.config.latent_mean is not None
    cfg = load_config(DiTTrainConfig, TINY, [
        "data.cache=", "data.train=builtin:shapes", f"data.tokenizer={setup / 'tok'}", "data.resolution=64",
        "data.builtin_size=32", "train.steps=2", "train.batch_size=4",
    ])
    out = train_dit(cfg, setup / "fly")
    assert (out / "model.safetensors").is_file()
    model = LightningDiT(cfg.model_config())
    task = DiTTask(model, Transport(), tok.normalize_latents, hflip=False, tokenizer=tok)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(task.latents({"image": images}), tok.normalize_latents(tok.encode(images)))
    labels = {"image": images, "label": torch.tensor([0, 10])}
    with pytest.raises(ValueError, match=r"labels span \[0, 10\] but the model has num_classes=10"):
        task.losses(labels, 0)


def test_cli_train_dit_runs_and_reports_bad_overrides(setup, capsys):
    run = setup / "cli"
    args = ["train-dit", str(TINY), "--out", str(run), f"data.cache={setup / 'cache'}", "train.steps=2", "train.batch_size=4"]
    assert main(args) == 0
    assert (run / "model" / "config.json").is_file() and (run / "config.yaml").is_file()
    capsys.readouterr()
    assert main(["train-dit", str(TINY), "--out", str(run), "train.stepz=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown config key 'train.stepz'" in err and "\n" not in err


def test_cli_resume_with_another_batch_size_or_width_names_what_changed(setup, tmp_path, capsys):
    args = ["train-dit", str(TINY), "--out", str(tmp_path / "run"), f"data.cache={setup / 'cache'}", "train.batch_size=4"]
    assert main([*args, "train.steps=2"]) == 0
    capsys.readouterr()
    for change, message in (
        ("train.batch_size=8", "written with train.batch_size=4, this run has train.batch_size=8"),
        ("model.hidden_size=32", "config changes since: model.hidden_size: 64 -> 32, train.steps: 2 -> 3"),
    ):
        assert main([*args, "train.steps=3", change]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert main([*args, "train.steps=3"]) == 0  # the unchanged settings still resume


def _plain_keys(config: LightningDiTConfig) -> set[str]:
    with torch.device("meta"):
        return set(LightningDiT(config).state_dict())


def test_train_compile_is_a_checked_key_and_a_compiled_run_saves_plain_weights(setup, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(DiTTrainConfig, TINY, ["train.compile=sometimes"])
    # Dynamo's graph capture with a graph-counting backend instead of inductor's code generation, which
    # costs minutes on this CPU (the slow test below runs inductor itself).
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    original = LightningDiT.compile_repeated_blocks
    monkeypatch.setattr(LightningDiT, "compile_repeated_blocks", lambda self: original(self, backend=counting_backend))
    torch._dynamo.reset()
    cfg = load_config(DiTTrainConfig, TINY, [f"data.cache={setup / 'cache'}", "train.steps=2", "train.batch_size=4",
                                             "train.ckpt_every=1", "train.compile=true"])
    model_dir = train_dit(cfg, tmp_path / "run")
    assert graphs, "train.compile=true did not run the blocks through torch.compile"
    raw = load_file(str(latest_checkpoint(tmp_path / "run" / "train") / "model_model.safetensors"))
    assert set(raw) == _plain_keys(cfg.model_config())  # no "_orig_mod." anywhere
    plain = LightningDiT(cfg.model_config())
    plain.load_state_dict(raw, strict=True)
    assert LightningDiT.from_pretrained(model_dir).config == cfg.model_config()
    # `aligntok sample --compile` samples through compiled blocks; the counting backend runs the captured
    # graphs as they are, so the samples are the eager ones up to rounding (uint8: at most 1 apart).
    captured = len(graphs)
    args = ["sample", "--dit", str(model_dir), "--tokenizer", str(setup / "tok"), "--num", "2", "--steps", "2",
            "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    assert len(graphs) == captured
    assert main([*args, "--out", str(tmp_path / "compiled"), "--compile"]) == 0
    assert len(graphs) > captured
    with np.load(tmp_path / "eager" / "samples.npz") as a, np.load(tmp_path / "compiled" / "samples.npz") as b:
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1


def test_train_compile_without_a_cxx_compiler_is_one_line(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    cfg = load_config(DiTTrainConfig, TINY, [f"data.cache={setup / 'cache'}", "train.steps=1", "train.batch_size=4",
                                             "train.compile=true"])
    with pytest.raises(ConfigError, match="train.compile=true on the CPU needs a C\\+\\+ compiler"):
        train_dit(cfg, tmp_path / "run")


@pytest.mark.slow  # inductor code generation for the block's forward and backward: ~30 s of CPU when not cached
@pytest.mark.skipif(not LightningDiT.can_compile("cpu"), reason="inductor on the CPU needs a C++ compiler")
def test_compiled_training_steps_match_eager_ones(setup, tmp_path):
    torch._dynamo.reset()
    overrides = [f"data.cache={setup / 'cache'}", "train.steps=3", "train.batch_size=8", "train.log_every=1",
                 "train.precision=fp32", "optim.warmup_steps=0"]
    runs = {}
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        cfg = load_config(DiTTrainConfig, TINY, [*overrides, f"train.compile={compiled}"])
        train_dit(cfg, tmp_path / name)
        checkpoint = latest_checkpoint(tmp_path / name / "train")
        runs[name] = (_losses(tmp_path / name), load_file(str(checkpoint / "model_model.safetensors")))
    (eager_losses, eager_weights), (compiled_losses, compiled_weights) = runs["eager"], runs["compiled"]
    # The same batches, t, noise and dropped labels (the dropout draw stays eager); inductor fuses the
    # blocks' elementwise ops, which changes fp32 rounding (~1e-6 relative per op), not the maths.
    # Measured: equal logged losses, weights within 6e-8 after 3 steps. An AdamW step moves a weight by
    # up to ~lr = 1e-3 whatever the gradient's size, so 1e-5 (1% of one step) still catches a wrong gradient.
    assert len(compiled_losses) == 3
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=0)
    assert set(compiled_weights) == set(eager_weights) == _plain_keys(cfg.model_config())
    for key, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[key], value, rtol=0, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
