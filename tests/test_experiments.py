"""`aligntok demo` and `aligntok reproduce` end to end on their minimal presets, and the aggregation."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from aligntok import standins
from aligntok.cli import main
from aligntok.config import ConfigError
from aligntok.experiments.demo import METRICS_KEYS, load_experiment_config
from aligntok.experiments.reproduce import (
    load_reproduce_config,
    mean_std,
    run_reproduce,
    steps_to_reach,
)
from aligntok.standins import EvalNetworkSettings

# An evaluation network trained for 4 steps: the tests check the plumbing, not its judgement.
TINY_EVAL = EvalNetworkSettings(widths=(8, 16, 16), resolution=64, steps=4, batch_size=8, data_size=32,
                                heldout_size=20, warmup_steps=1)


@pytest.fixture
def tiny_eval(tmp_path, monkeypatch):
    monkeypatch.setenv(standins.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(standins.EVAL_NETWORKS, "tiny", TINY_EVAL)


def _finite_numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for value in tree.values() for x in _finite_numbers(value)]
    if isinstance(tree, list):
        return [x for value in tree for x in _finite_numbers(value)]
    return [tree] if isinstance(tree, float) else []


def test_demo_runs_end_to_end_and_resumes(tmp_path, monkeypatch, capsys):
    # The demo's own evaluation network: shipped with the package, so nothing is trained before the pipeline.
    monkeypatch.setenv(standins.CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "demo"
    trained = dict(standins.TRAINING_RUNS)
    assert main(["demo", "--preset", "minimal", "--out", str(out), "--threads", "1"]) == 0
    assert standins.TRAINING_RUNS == trained and not (tmp_path / "cache").exists()
    report = (out / "report.html").read_text()
    for heading in ("Metrics", "Generation", "Inputs and reconstructions", "Samples per class", "Loss curves",
                    "The latent space"):
        assert f"<h2>{heading}</h2>" in report
    headline = json.loads((out / "metrics.json").read_text())
    assert tuple(headline) == METRICS_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in headline.values()), headline
    assert "<code>random</code>" in report  # the intro names the encoder (the minimal preset's is random)
    assert "not LPIPS-VGG" in report and report.count("data:image/png;base64") >= 6
    results = json.loads((out / "results" / "demo.json").read_text())
    for stage in ("1", "2", "3"):
        metrics = results["reconstruction"][stage]
        for key in ("psnr", "ssim", "perceptual", "rfd", "linear_probe"):
            assert math.isfinite(metrics[key]), (stage, key)
        assert 0 <= metrics["linear_probe"] <= 1
        assert 0 <= metrics["recon_class_accuracy"] <= 1 and 0 <= metrics["orig_class_accuracy"] <= 1
    final = results["reconstruction"]["3"]
    assert headline["psnr"] == final["psnr"] and headline["probe_accuracy"] == final["linear_probe"]
    assert headline["recon_class_accuracy"] == final["recon_class_accuracy"]
    assert headline["guided_class_accuracy"] == results["generation"]["guided"]["class_accuracy"]
    assert headline["gfd_unguided"] == results["generation"]["unguided"]["gfd"]
    for kind in ("guided", "unguided"):
        assert math.isfinite(results["generation"][kind]["gfd"]) and results["generation"][kind]["num_samples"] == 20
    assert results["generation"]["guided"]["sampler"]["cfg_scale"] == 4.0
    assert results["generation"]["unguided"]["sampler"]["cfg_scale"] == 1.0

    # A second run reads everything back: no training, same numbers.
    weights = out / "dit" / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    trained = dict(standins.TRAINING_RUNS)
    assert main(["demo", "--preset", "minimal", "--out", str(out), "--threads", "1"]) == 0
    assert weights.stat().st_mtime_ns == before and standins.TRAINING_RUNS == trained
    again = json.loads((out / "results" / "demo.json").read_text())
    assert again["reconstruction"] == results["reconstruction"] and again["generation"] == results["generation"]

    # Another config into the same folder would read this one's results back: refused in one line.
    assert main(["demo", "--preset", "minimal", "--out", str(out), "dit.train.steps=7"]) == 2
    assert "holds results of another experiment config" in capsys.readouterr().err
    # So would another run's outputs in a folder no demo has claimed (here: this demo's DiT and latents).
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name in ("dit", "latents"):
        shutil.copytree(out / name, foreign / name)
    assert main(["demo", "--preset", "minimal", "--out", str(foreign), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "already holds files but no experiment.yaml" in err and not (foreign / "experiment.yaml").exists()


def test_reproduce_compares_methods_over_seeds_with_ablation_and_curves(tmp_path, tiny_eval, caplog):
    out = tmp_path / "reproduce"
    run_reproduce(out, preset="minimal", overrides=["experiment.eval.eval_network=tiny"], progress=False)
    results = json.loads((out / "results.json").read_text())
    assert set(results["tokenizer_table"]) == {"aligntok", "vae", "vavae"}
    for method, row in results["tokenizer_table"].items():
        for key in ("psnr", "linear_probe", "gfd_guided", "gfd_unguided", "rfd", "perceptual", "recon_class_accuracy"):
            assert row[key]["n"] == 2 and all(math.isfinite(v) for v in row[key]["values"]), (method, key)
        # Seeds change training and sampling: the two runs differ.
        assert row["psnr"]["values"][0] != row["psnr"]["values"][1]
    # The DiT checkpoints every 3 of 6 steps: the training-step curve has both points for every method.
    for curves in results["curves"].values():
        assert [p["x"] for p in curves["by_training_step"]] == [3.0, 6.0]
        assert [p["x"] for p in curves["by_training_step_guided"]] == [3.0, 6.0]
        assert [p["x"] for p in curves["by_sampling_steps"]] == [1.0, 2.0]
        assert [p["x"] for p in curves["by_cfg_scale"]] == [1.0, 2.0]
    assert list(results["ablation"]) == ["stage 1 only", "stages 1+2, w_sp=0", "stages 1+2, w_sp=1", "all three stages"]
    reach = results["steps_to_reach_vae_final_gfd"]
    assert set(reach) == {"unguided", "guided"}
    for kind, entry in reach.items():
        assert entry["target_gfd"] == results["tokenizer_table"]["vae"][f"gfd_{kind}"]["mean"]
        assert set(entry["methods"]) == {"aligntok", "vae", "vavae"}
        for r in entry["methods"].values():
            assert r["seeds"] == 2 and len(r["per_seed"]) == 2
            assert r["reached"] == sum(step is not None for step in r["per_seed"])
    # The final checkpoint's gFD without guidance is the table's (the same samples from the same EMA weights).
    for method, per_seed in results["per_seed"].items():
        for r in per_seed.values():
            assert r["by_training_step"]["6"]["gfd"] == pytest.approx(r["unguided"]["gfd"], rel=1e-6)
    assert _finite_numbers(results["tokenizer_table"])

    runs = out / "runs"
    # Baselines train one stage as long as AlignTok's three together (3 + 2 + 2 steps).
    vae_log = (runs / "vae" / "seed0" / "tokenizer" / "train" / "stage1" / "log.jsonl").read_text().splitlines()
    assert json.loads(vae_log[-1])["step"] == 7
    # The ablation starts from the main run's stage 1, and reuses its stage 2 where w_sp is the main run's.
    main_stage1 = (runs / "aligntok" / "seed0" / "tokenizer" / "stage1" / "model.safetensors").read_bytes()
    ablation = runs / "ablation" / "seed0"
    assert (ablation / "stages12_w_sp0" / "tokenizer" / "stage1" / "model.safetensors").read_bytes() == main_stage1
    # copied with its training folder, not retrained
    main_log = (runs / "aligntok" / "seed0" / "tokenizer" / "train" / "stage2" / "log.jsonl").read_text()
    assert (ablation / "stages12_w_sp1" / "tokenizer" / "train" / "stage2" / "log.jsonl").read_text() == main_log
    assert (ablation / "stages12_w_sp0" / "tokenizer" / "train" / "stage2").is_dir()
    # so the retrained stage 2 continues stage 1's discriminator, as the main run's did
    assert "discriminator cannot be carried over" not in caplog.text
    for plot in ("gfd_vs_training_steps", "gfd_vs_sampling_steps", "gfd_vs_cfg_scale"):
        assert (out / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.html").read_text()
    assert all(name in report for name in ("AlignTok", "VA-VAE", "VAE", "w_sp", "± "))
    assert results["resumed"] is False and "resumed" not in report
    # Re-running reads every result back; its time is then only the last invocation's, and the report says so.
    run_reproduce(out, preset="minimal", overrides=["experiment.eval.eval_network=tiny"], progress=False)
    again = json.loads((out / "results.json").read_text())
    assert again["resumed"] is True and again["tokenizer_table"] == results["tokenizer_table"]
    assert "resumed from earlier ones not counted" in (out / "report.html").read_text()
    # Another config in the same folder is refused before anything runs, not mixed in.
    with pytest.raises(ConfigError, match="another reproduce config"):
        run_reproduce(out, preset="minimal", overrides=["experiment.eval.eval_network=tiny", "seeds=[1,2]"], progress=False)


def test_presets_load_and_validate():
    from aligntok.standins import EVAL_NETWORKS, STANDIN_ENCODERS
    from aligntok.standins.cache import shipped_directory

    demo = load_experiment_config(["demo"])
    assert demo.tokenizer.model.encoder == "standin:dinov2-shapes-p8" and demo.tokenizer.method == "aligntok"
    # A first run trains no stand-in: both are shipped. The latent is 8x8, as the DiT expects.
    assert shipped_directory("encoder", STANDIN_ENCODERS["dinov2-shapes-p8"]) is not None
    assert shipped_directory("eval", EVAL_NETWORKS[demo.eval.eval_network]) is not None
    assert demo.difficulty == "centered" and demo.tokenizer.model.decoder.stride == 8
    # Its evaluation network was trained on a superset of the demo's scenes (centered is a subset of easy).
    assert EVAL_NETWORKS[demo.eval.eval_network].difficulty == "easy"
    assert 64 // demo.tokenizer.model.decoder.stride == demo.dit.model_config().input_size
    for preset in ("quick", "full", "minimal"):
        cfg = load_reproduce_config(preset)
        assert cfg.methods == ["aligntok", "vae", "vavae"] and len(cfg.seeds) >= 2
    assert len(load_reproduce_config("full").seeds) >= 3 and len(load_reproduce_config("quick").seeds) >= 2
    # The demo's DiT decays its learning rate over its one run (measured better there); the reproduction's
    # convergence curves read every checkpoint of a run as a point on one curve, so they keep a constant rate.
    assert demo.dit.optim.schedule == "cosine"
    for preset in ("quick", "full"):
        reproduce = load_reproduce_config(preset).experiment
        assert reproduce.dit.optim.schedule == "constant"
        # The semantic stand-in: the paper's premise (a latent that keeps the encoder's semantics) can hold.
        assert reproduce.tokenizer.model.encoder == "standin:dinov2-centered-p8"
        # ... trained on the reproduction's own data, as DINOv2 on natural images; shipped, so never trained here.
        assert STANDIN_ENCODERS["dinov2-centered-p8"].difficulty == reproduce.difficulty == "centered"
        assert shipped_directory("encoder", STANDIN_ENCODERS["dinov2-centered-p8"]) is not None
    with pytest.raises(ConfigError, match="held-out seed"):
        load_reproduce_config("minimal", ["seeds=[0,777]"])
    with pytest.raises(ConfigError, match="methods"):
        load_reproduce_config("minimal", ["methods=[aligntok,sdvae]"])
    with pytest.raises(ConfigError, match="preset"):
        load_reproduce_config("huge")


def test_cli_rejects_an_unknown_preset(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--preset", "huge"])
    assert "invalid choice" in capsys.readouterr().err


def test_mean_std_and_steps_to_reach():
    stats = mean_std([1.0, 2.0, 3.0])
    assert stats["mean"] == 2.0 and stats["std"] == pytest.approx(1.0) and stats["n"] == 3
    assert mean_std([4.0])["std"] == 0.0
    curve = [{"x": 100.0, "mean": 9.0}, {"x": 200.0, "mean": 5.0}, {"x": 300.0, "mean": 4.0}]
    assert steps_to_reach(curve, 5.0) == 200.0
    assert steps_to_reach(curve, 4.5) == 300.0
    assert steps_to_reach(curve, 1.0) is None
