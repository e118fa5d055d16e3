"""train-t2i and sample-t2i end to end on tiny models: loss falls, exact resume, caption dropout, samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aligntok.cli import main
from aligntok.config import load_config
from aligntok.diffusion.t2i_training import (
    T2ITrainConfig,
    caption_dropped,
    resolution_shift,
    shift_time,
    train_t2i,
)
from aligntok.models.text import build_tiny_text_encoders
from aligntok.models.word_tokenizer import caption_words
from aligntok.standins.text import builtin_captions

TINY = Path(__file__).resolve().parents[1] / "configs" / "t2i" / "tiny.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("t2i")
    tiny_tokenizer(root / "tok", 8)
    build_tiny_text_encoders(root / "text", caption_words(builtin_captions(200)), width=16, layers=1, heads=2)
    return root


def _overrides(root: Path, steps: int = 40) -> list[str]:
    return ["validation.every=20", "validation.steps=2", "validation.prompts=[a red circle,a blue square left of a cross]",
            f"data.tokenizer={root / 'tok'}", "data.build_tokenizer=null", f"text.encoder={root / 'text' / 't5'}",
            f"train.steps={steps}", "train.batch_size=8", "train.log_every=5", "train.ckpt_every=20",
            "data.builtin_size=64", "data.stats_samples=32", "optim.warmup_steps=5", "text.caption_dropout=0.2"]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["model/loss"] for line in (run / "train" / "log.jsonl").read_text().splitlines()]


def test_resolution_shift_and_time_shift():
    assert resolution_shift(256) == pytest.approx(1 / np.exp(0.5))
    assert resolution_shift(1024) == pytest.approx(1 / 1.8776, rel=1e-3)
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(shift_time(t, 0.5), torch.tensor([0.0, 1 / 3, 1.0]))


def test_caption_dropout_is_a_pure_function_at_the_requested_rate():
    keys = list(range(10000))
    first = caption_dropped(3, 17, keys, 0.1)
    assert first == caption_dropped(3, 17, keys, 0.1)
    assert first != caption_dropped(3, 18, keys, 0.1) and first != caption_dropped(4, 17, keys, 0.1)
    assert abs(sum(first) / len(first) - 0.1) < 0.01
    assert caption_dropped(3, 17, keys[:5], 0.0) == [False] * 5


@pytest.fixture(scope="module")
def tiny_run(setup):
    cfg = load_config(T2ITrainConfig, TINY, _overrides(setup))
    return cfg, train_t2i(cfg, setup / "run")


def test_train_t2i_lowers_the_loss_and_records_normalisation(tiny_run):
    _, model_dir = tiny_run
    losses = _losses(model_dir.parent)
    assert np.mean(losses[-2:]) < losses[0]
    info = json.loads((model_dir / "aligntok_t2i.json").read_text())
    assert len(info["latent_mean"]) == 8 and len(info["latent_std"]) == 8
    assert info["train_shift"] == pytest.approx(resolution_shift(16)) and info["resolution"] == 64
    grids = sorted(p.name for p in (model_dir.parent / "train" / "validation").iterdir())
    assert grids == ["step-0000020.png", "step-0000040.png"]


def test_resume_after_a_kill_is_exact_including_caption_dropout(setup, tiny_run):
    from safetensors.torch import load_file

    cfg = load_config(T2ITrainConfig, TINY, _overrides(setup, steps=20))
    train_t2i(cfg, setup / "half")  # "killed" at step 20 (its checkpoint), then resumed to 40
    cfg = load_config(T2ITrainConfig, TINY, _overrides(setup, steps=40))
    resumed = train_t2i(cfg, setup / "half")
    a = load_file(str(tiny_run[1] / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(setup / "half") == _losses(setup / "run")


def test_sample_t2i_decodes_to_the_requested_size_one_vs_two_processes(setup, tiny_run):
    _, model_dir = tiny_run
    prompts = setup / "prompts.txt"
    prompts.write_text("a red circle at the top left on a plain gray background\n"
                       "a blue square left of a green cross on a plain gray background\n"
                       "two red circles and a blue square on a plain gray background\n")
    common = ["sample-t2i", "--model", str(model_dir), "--tokenizer", str(setup / "tok"), "--prompts", str(prompts),
              "--steps", "3", "--cfg-scale", "3", "--batch-size", "2", "--height", "48", "--width", "80"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*common, "--out", str(setup / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    images = [np.asarray(Image.open(setup / "one" / f"{i:05d}.png")) for i in range(3)]
    assert all(im.shape == (48, 80, 3) for im in images)
    settings = json.loads((setup / "one" / "sampling.json").read_text())
    assert settings["height"] == 48 and settings["width"] == 80 and len(settings["prompts"]) == 3
    assert (setup / "one" / "grid.png").is_file()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "aligntok.cli", "--", *common, "--out", str(setup / "two")],
                         check=False, capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    for i in range(3):
        assert np.array_equal(images[i], np.asarray(Image.open(setup / "two" / f"{i:05d}.png")))


def test_sample_t2i_errors_are_one_line(setup, tiny_run, capsys):
    _, model_dir = tiny_run
    code = main(["sample-t2i", "--model", str(model_dir), "--tokenizer", str(setup / "tok"), "--prompt", "a circle",
                 "--height", "40", "--out", str(setup / "bad")])
    assert code == 2 and "multiples of 16" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_train_t2i_with_aspect_ratio_buckets(setup, tmp_path, source):
    from aligntok.data import write_shards

    folder = tmp_path / "images"
    folder.mkdir()
    samples = []
    for i in range(8):
        size = (96, 40) if i % 2 else (40, 96)
        samples.append({"image": Image.new("RGB", size, (30 * i, 200, 90)), "caption": "a wide picture" if i % 2 else "a tall picture"})
        samples[-1]["image"].save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(samples[-1]["caption"])
    if source == "shards":
        write_shards(samples, str(tmp_path / "shards" / "%06d.tar"), maxcount=5)
        folder = tmp_path / "shards" / "{000000..000001}.tar"
    cfg = load_config(T2ITrainConfig, TINY, [*_overrides(setup, steps=4), f"data.train={folder}", "data.buckets=[2/1,1/2]",
                                             "train.batch_size=4", "data.stats_samples=8"])
    model_dir = train_t2i(cfg, tmp_path / "run")
    info = json.loads((model_dir / "aligntok_t2i.json").read_text())
    assert info["buckets"] == ["2/1", "1/2"] and len(_losses(tmp_path / "run")) >= 1


@pytest.mark.parametrize("name", ["tiny", "flux2b_laion256", "flux2b_laion512_ar"])
def test_shipped_t2i_configs_load(name):
    cfg = load_config(T2ITrainConfig, TINY.parent / f"{name}.yaml")
    if name.startswith("flux2b"):
        assert cfg.preset == "FLUX-2B" and cfg.text.encoder == "google/t5-v1_1-xxl" and not cfg.data.hflip
        assert cfg.model_config(in_channels=32, pack=1, text_dim=4096, pooled_dim=768).width == 1536
    if name.endswith("_ar"):
        from aligntok.data.buckets import bucket_table

        assert len(bucket_table(cfg.data.resolution, cfg.data.buckets)) == 9


def test_laion_tokenizer_config_has_w_sp_3_and_shards():
    from aligntok.training.stages import TokenizerTrainConfig

    cfg = load_config(TokenizerTrainConfig, TINY.parents[1] / "tokenizer" / "aligntok_dinov2_f16d32_laion.yaml")
    assert cfg.semantic.weight == 3.0 and cfg.data.train.endswith(".tar")


def test_init_from_starts_a_fresh_run_from_a_model(setup, tiny_run, tmp_path):
    from safetensors.torch import load_file

    _, model_dir = tiny_run
    cfg = load_config(T2ITrainConfig, TINY, [*_overrides(setup, steps=0), f"init_from={model_dir}"])
    out = train_t2i(cfg, tmp_path / "ft")
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(model_dir / weights)), load_file(str(out / weights))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_latents_with_captions_then_train_from_the_cache(setup, tmp_path, tiny_tokenizer):
    from aligntok.data.builtin import swap_left_right
    from aligntok.data.latent_dataset import LatentDataset
    from aligntok.data.scenes import make_scene_graph

    tok = tiny_tokenizer(tmp_path / "tok", 8)
    assert main(["cache-latents", "--tokenizer", str(tok), "--data", "builtin:scenes", "--resolution", "64",
                 "--builtin-size", "24", "--shard-size", "16", "--num-workers", "0", "--captions",
                 "--out", str(tmp_path / "cache")]) == 0
    cache = LatentDataset(tmp_path / "cache")
    assert cache.has_captions and cache.metadata["image_size"] == [64, 64]
    for i in (0, 17):
        item = cache[i]
        assert item["caption"] == make_scene_graph(0, item["index"]).caption
        assert item["caption_flip"] == swap_left_right(item["caption"])
    cfg = load_config(T2ITrainConfig, TINY, [*_overrides(setup, steps=6), f"data.tokenizer={tok}", "data.train=null",
                                             f"data.cache={tmp_path / 'cache'}"])
    model_dir = train_t2i(cfg, tmp_path / "run")
    info = json.loads((model_dir / "aligntok_t2i.json").read_text())
    assert info["latent_mean"] == pytest.approx(cache.metadata["latent_mean"])


def test_fsdp_training_matches_replicated_training(setup, tmp_path):
    """FSDP2 shards the wrapper's double and single block lists (the engine's outermost ModuleLists) and
    trains what replicated data parallelism trains on the same two ranks, up to float reduction order."""
    from safetensors.torch import load_file

    overrides = [*_overrides(setup, steps=3), "train.batch_size=4", "train.ema_decay=0", "data.num_workers=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for mode in ("replicated", "fsdp"):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                              "aligntok.cli", "--", "train-t2i", str(TINY), "--out", str(tmp_path / mode), *overrides,
                              f"train.fsdp={mode == 'fsdp'}"], check=False, capture_output=True, text=True, env=env,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    weights = "model/transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "replicated" / weights)), load_file(str(tmp_path / "fsdp" / weights))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert a["proj_out.weight"].abs().sum() > 0  # trained away from the zero init


def test_train_t2i_streams_square_crops_from_captioned_shards(setup, tmp_path):
    from aligntok.data import write_shards

    samples = [{"image": Image.new("RGB", (80, 64), (20 * i, 90, 200)), "caption": f"a blue picture number {i}"}
               for i in range(8)]
    write_shards(samples, str(tmp_path / "%06d.tar"), maxcount=4)
    cfg = load_config(T2ITrainConfig, TINY, [*_overrides(setup, steps=3), f"data.train={tmp_path}/{{000000..000001}}.tar",
                                             "train.batch_size=4", "data.stats_samples=8", "data.hflip=false"])
    train_t2i(cfg, tmp_path / "run")
    assert all(np.isfinite(_losses(tmp_path / "run")))


def test_a_prompts_image_does_not_depend_on_its_batch(setup, tiny_run, tmp_path):
    from aligntok.diffusion.samplers import SamplerConfig
    from aligntok.diffusion.t2i_sampling import T2ISampleConfig, sample_t2i

    prompts = ["a red circle", "a blue square left of a green cross on a plain gray background", "two red circles"]
    images = {}
    for batch in (1, 3):
        config = T2ISampleConfig(batch_size=batch, seed=5, sampler=SamplerConfig(num_steps=3, cfg_scale=2.0))
        sample_t2i(tiny_run[1], setup / "tok", prompts, tmp_path / str(batch), config)
        images[batch] = [np.asarray(Image.open(tmp_path / str(batch) / f"{i:05d}.png"), np.int16) for i in range(3)]
    for a, b in zip(images[1], images[3], strict=True):  # other padding lengths: equal up to float rounding
        assert np.abs(a - b).max() <= 1


def test_an_interrupted_sample_t2i_resumes_with_only_the_missing_batches(setup, tiny_run, tmp_path, monkeypatch):
    from aligntok.diffusion import t2i_sampling
    from aligntok.diffusion.samplers import SamplerConfig
    from aligntok.diffusion.t2i_sampling import T2ISampleConfig, sample_t2i

    prompts = ["a red circle", "two blue squares", "a green cross", "a heart"]
    config = T2ISampleConfig(batch_size=2, seed=1, sampler=SamplerConfig(num_steps=2, cfg_scale=2.0))
    sample_t2i(tiny_run[1], setup / "tok", prompts, tmp_path / "straight", config)
    real_generate, calls = t2i_sampling.T2IGenerator.generate, []

    def generate(self, batch_prompts, indices, cfg):
        calls.append(list(indices))
        if kill and len(calls) == 2:
            raise KeyboardInterrupt  # the machine stops mid-run
        return real_generate(self, batch_prompts, indices, cfg)

    monkeypatch.setattr(t2i_sampling.T2IGenerator, "generate", generate)
    kill = True
    with pytest.raises(KeyboardInterrupt):
        sample_t2i(tiny_run[1], setup / "tok", prompts, tmp_path / "resumed", config)
    calls.clear()
    kill = False
    sample_t2i(tiny_run[1], setup / "tok", prompts, tmp_path / "resumed", config)
    assert calls == [[2, 3]]  # the first batch came from the interrupted run
    for i in range(len(prompts)):
        straight = np.asarray(Image.open(tmp_path / "straight" / f"{i:05d}.png"))
        assert np.array_equal(straight, np.asarray(Image.open(tmp_path / "resumed" / f"{i:05d}.png")))
    assert not (tmp_path / "resumed" / ".parts").exists()


def test_token_pixels_sets_the_packing_and_sampling_follows_it(setup, tmp_path):
    from aligntok.diffusion.t2i_sampling import T2IGenerator, T2ISampleConfig

    cfg = load_config(T2ITrainConfig, TINY, [*_overrides(setup, steps=2), "token_pixels=32", "validation.every=0"])
    model_dir = train_t2i(cfg, tmp_path / "p2")
    generator = T2IGenerator.load(model_dir, setup / "tok")
    assert generator.model.config.pack == 2 and generator.model.config.token_channels == 32  # stride 16: 2x2 per token
    images = generator.generate(["a red circle"], [0], T2ISampleConfig())
    assert images.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="multiples of 32"):
        generator.latent_size(48, 48)  # a 3x3 latent cannot be packed 2x2
    with pytest.raises(ValueError, match="positive multiples"):
        generator.latent_size(0, 0)  # not the default resolution
    assert generator.latent_size(None, None) == (4, 4)


def test_token_pixels_not_a_multiple_of_the_stride_is_a_config_error(setup, tmp_path):
    from aligntok.config import ConfigError

    cfg = load_config(T2ITrainConfig, TINY, [*_overrides(setup, steps=1), "token_pixels=8"])
    with pytest.raises(ConfigError, match="does not divide token_pixels=8"):
        train_t2i(cfg, tmp_path / "bad")


def test_a_model_refuses_a_tokenizer_of_another_stride(setup, tiny_run, tmp_path):
    import shutil

    from aligntok.diffusion.t2i_sampling import T2IGenerator

    model_dir = shutil.copytree(tiny_run[1], tmp_path / "model")
    info = json.loads((model_dir / "aligntok_t2i.json").read_text())
    (model_dir / "aligntok_t2i.json").write_text(json.dumps({**info, "tokenizer_stride": 8}))
    with pytest.raises(ValueError, match="trained on stride-8 latents"):
        T2IGenerator.load(model_dir, setup / "tok")
