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
    assert (out / "tokenizer" / "stage3" / "config.json").is_file()  # trained with the minimal demo preset
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
