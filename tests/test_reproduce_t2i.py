"""`aligntok reproduce --preset t2i-minimal` end to end: finite metrics under the documented keys, curves, report."""

from __future__ import annotations

import json
import math

import pytest

from aligntok import standins
from aligntok.cli import main
from aligntok.config import ConfigError
from aligntok.eval.geneval import TASKS
from aligntok.experiments.reproduce_t2i import load_t2i_reproduce_config, summarize
from aligntok.models.text import build_tiny_text_encoders
from aligntok.models.word_tokenizer import caption_words
from aligntok.standins.text import builtin_captions

METHODS = {"aligntok", "flux-vae", "vae"}


def _stats_ok(stats, n: int) -> bool:
    return stats["n"] == n and len(stats["values"]) == n and all(math.isfinite(v) for v in stats["values"])


@pytest.mark.filterwarnings("ignore::aligntok.eval.fid.SingularCovarianceWarning")  # 8 held-out captions
def test_t2i_minimal_reproduction_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv(standins.CACHE_ENV, str(tmp_path / "cache"))  # the shipped evaluation CNN: nothing trained
    build_tiny_text_encoders(tmp_path / "text", caption_words(builtin_captions(100)), width=16, layers=1, heads=2)
    out = tmp_path / "reproduce"
    overrides = [f"t2i.text.encoder={tmp_path / 'text' / 't5'}", "judge.steps=5", "judge.train_images=40",
                 "judge.prompt_scenes=8", "clip.steps=2", "clip.train_images=16", "clip.prompt_scenes=8"]
    assert main(["reproduce", "--preset", "t2i-minimal", "--out", str(out), *overrides]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["aligntok", "flux-vae", "vae"] and results["seeds"] == [0, 1]
    assert set(results["judge_ceiling"]["tasks"]) == set(TASKS) and 0 <= results["judge_ceiling"]["overall"] <= 1
    assert math.isfinite(results["clip_ceiling"]["clip_score_real"])
    assert set(results["table"]) == METHODS
    for method, row in results["table"].items():
        for key in ("geneval_overall", "gfd_guided", "gfd_unguided", "clip_score", "tokenizer_ceiling", "psnr", "rfd"):
            assert _stats_ok(row[key], 2), (method, key)
        assert set(row["geneval_tasks"]) == set(TASKS) and set(row["tokenizer_ceiling_tasks"]) == set(TASKS)
        assert all(_stats_ok(s, 2) for s in row["geneval_tasks"].values())
        # Seeds change the tokenizer's training: the two reconstructions differ.
        assert row["psnr"]["values"][0] != row["psnr"]["values"][1]
    # Checkpoints every 2 of 4 T2I steps: every curve has both points, each over both seeds.
    for method, curves in results["curves"].items():
        assert set(curves) == {"geneval_overall", "gfd_guided", "gfd_unguided", "clip_score"}
        for metric, points in curves.items():
            assert [p["x"] for p in points] == [2.0, 4.0] and all(_stats_ok(p, 2) for p in points), (method, metric)
    # The table is the final checkpoint's.
    for method, per_seed in results["per_seed"].items():
        for seed, r in per_seed.items():
            assert results["table"][method]["gfd_guided"]["values"][int(seed)] == r["by_training_step"]["4"]["gfd_guided"]
    runs = out / "runs"
    # Same budget: a baseline's one stage is as long as AlignTok's three (3 + 2 + 2 steps in the minimal preset).
    for baseline in ("vae", "flux-vae"):
        log = (runs / baseline / "seed0" / "tokenizer" / "train" / "stage1" / "log.jsonl").read_text().splitlines()
        assert json.loads(log[-1])["step"] == 7
    flux = json.loads((runs / "flux-vae" / "seed0" / "tokenizer" / "stage1" / "config.json").read_text())
    assert "AutoencoderKL" in json.dumps(flux)
    for plot in ("t2i_geneval_vs_training_steps", "t2i_gfd_vs_training_steps", "t2i_gfd_vs_training_steps_guided"):
        assert (out / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.html").read_text()
    assert all(name in report for name in ("AlignTok", "FLUX VAE", "judge ceiling", "tokenizer ceiling", "± "))
    assert report.count("<img") == 4 + 6  # the curves, and one sample grid per GenEval task
    # Re-running reads every measurement back: the same numbers, no retraining.
    mtime = (runs / "aligntok" / "seed0" / "t2i" / "model" / "aligntok_t2i.json").stat().st_mtime_ns
    assert main(["reproduce", "--preset", "t2i-minimal", "--out", str(out), *overrides]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["table"] == results["table"]
    assert (runs / "aligntok" / "seed0" / "t2i" / "model" / "aligntok_t2i.json").stat().st_mtime_ns == mtime
    # Another config in the same folder is refused, not mixed in.
    with pytest.raises(ConfigError, match="another reproduce config"):
        from aligntok.experiments.reproduce_t2i import run_reproduce_t2i

        run_reproduce_t2i(out, preset="t2i-minimal", overrides=[*overrides, "eval.sample_steps=3"], progress=False)


def test_t2i_presets_load_and_validate():
    quick, full = load_t2i_reproduce_config("t2i-quick"), load_t2i_reproduce_config("t2i-full")
    assert len(quick.seeds) == 2 and len(full.seeds) == 3
    for cfg in (quick, full):
        assert set(cfg.methods) == METHODS and cfg.tokenizer.data.train == "builtin:scenes"
        assert cfg.tokenizer.flux_vae.latent_channels == 16 and cfg.tokenizer.flux_vae.stride == 8
        assert cfg.t2i.train.ckpt_every < cfg.t2i.train.steps  # curves have several points
        # docs/reproduction-t2i's encoder, whatever the demo's tokenizer (merged under it) uses.
        assert cfg.tokenizer.model.encoder == "standin:dinov2-shapes-p8"
    with pytest.raises(ConfigError, match="held-out seed"):
        load_t2i_reproduce_config("t2i-minimal", ["seeds=[0,777]"])
    with pytest.raises(ConfigError, match="builtin:scenes"):
        load_t2i_reproduce_config("t2i-minimal", ["t2i.data.train=builtin:shapes"])
    with pytest.raises(ConfigError):
        load_t2i_reproduce_config("t2i-huge")


def test_summarize_takes_the_final_checkpoint_and_spreads_over_seeds():
    def run(gfd_by_step: dict[str, float], psnr: float) -> dict:
        tasks = dict.fromkeys(TASKS, 0.5)
        return {"tokenizer": {"tokenizer_ceiling": 0.5, "tokenizer_ceiling_tasks": tasks, "psnr": psnr, "rfd": 1.0,
                              "clip_score_reconstructions": 20.0},
                "by_training_step": {s: {"geneval_overall": 0.25, "geneval_tasks": tasks, "gfd_guided": g,
                                         "gfd_unguided": 2 * g, "clip_score": 10.0} for s, g in gfd_by_step.items()}}

    # Keys as JSON reads them back ("10" sorts before "5" as text: the final step is found as a number).
    summary = summarize({"aligntok": {0: run({"5": 4.0, "10": 2.0}, 20.0), 1: run({"5": 6.0, "10": 4.0}, 22.0)}})
    row = summary["table"]["aligntok"]
    assert row["gfd_guided"]["mean"] == pytest.approx(3.0) and row["gfd_guided"]["std"] == pytest.approx(2 ** 0.5)
    assert row["gfd_unguided"]["values"] == [4.0, 8.0] and row["psnr"]["values"] == [20.0, 22.0]
    assert [(p["x"], p["mean"]) for p in summary["curves"]["aligntok"]["gfd_guided"]] == [(5.0, 5.0), (10.0, 3.0)]
