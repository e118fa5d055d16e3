"""demo-t2i's minimal preset end to end: finite metrics under the issue's key names, report, GenEval files."""

from __future__ import annotations

import json
import math

from aligntok.cli import main
from aligntok.eval.geneval import read_results, summarize_results
from aligntok.models.text import build_tiny_text_encoders
from aligntok.models.word_tokenizer import caption_words
from aligntok.standins.text import builtin_captions


def test_minimal_demo_t2i_runs_end_to_end(tmp_path, capsys):
    build_tiny_text_encoders(tmp_path / "text", caption_words(builtin_captions(100)), width=16, layers=1, heads=2)
    out = tmp_path / "demo"
    options = ["--out", str(out), "--preset", "minimal", f"tokenizer={tmp_path / 'no-demo-here'}",
               f"t2i.text.encoder={tmp_path / 'text' / 't5'}"]
    assert main(["demo-t2i", *options]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("geneval_overall", "judge_ceiling", "tokenizer_ceiling", "clip_score", "wall_seconds"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert set(metrics["geneval_tasks"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    # Trained with the minimal demo preset, whose stage 3 is replaced by the decoder fine-tune on scenes.
    assert (out / "tokenizer" / "stage2" / "config.json").is_file() and not (out / "tokenizer" / "stage3").exists()
    assert metrics["tokenizer"] == str(out / "tokenizer-finetune" / "stage3")
    rows = read_results(out / "geneval" / "results.jsonl")
    assert summarize_results(rows)["overall"] == metrics["geneval_overall"]
    assert (out / "geneval" / "00000" / "samples" / "0000.png").is_file()
    report = (out / "report.html").read_text()
    assert "Miniature GenEval" in report and "a red circle at the top left" in report
    # Re-running resumes: nothing is trained again and the same metrics come back.
    assert main(["demo-t2i", *options]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["geneval_overall"] == metrics["geneval_overall"] and "FLUX-tiny training" in again["timings_seconds"]
    assert "stand-in judge training" not in again["timings_seconds"]
    # Another config into the same folder would read this one's models back: refused in one line.
    assert main(["demo-t2i", *options, "t2i.train.steps=3"]) == 2
    assert "holds results of another demo-t2i config" in capsys.readouterr().err


def test_a_reused_tokenizer_keeps_its_latents_and_gets_its_decoder_fine_tuned(tmp_path):
    import torch

    from aligntok.experiments.demo import load_experiment_config
    from aligntok.models.tokenizer import AlignTokTokenizer
    from aligntok.training.stages import train_tokenizer

    build_tiny_text_encoders(tmp_path / "text", caption_words(builtin_captions(100)), width=16, layers=1, heads=2)
    demo_tokenizer = train_tokenizer(load_experiment_config(["demo", "minimal"]).tokenizer, tmp_path / "demo")[3]
    out = tmp_path / "t2i"
    assert main(["demo-t2i", "--out", str(out), "--preset", "minimal", f"tokenizer={demo_tokenizer}",
                 f"t2i.text.encoder={tmp_path / 'text' / 't5'}"]) == 0
    assert not (out / "tokenizer").exists()  # reused, not trained again
    before, after = AlignTokTokenizer.from_pretrained(demo_tokenizer), AlignTokTokenizer.from_pretrained(
        out / "tokenizer-finetune" / "stage3")
    for part, same in (("encoder", True), ("adapter", True), ("decoder", False)):
        a, b = getattr(before, part).state_dict(), getattr(after, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a) == same, part
