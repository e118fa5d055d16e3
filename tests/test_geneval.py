"""GenEval's formats: the folder layout sample-t2i writes from its metadata, and summary_scores.py's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aligntok.cli import main
from aligntok.eval.geneval import (
    GenEvalFormatError,
    read_metadata,
    summarize_results,
    write_geneval_folder,
)

METADATA = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
    {"tag": "counting", "include": [{"class": "square", "count": 2}], "exclude": [{"class": "square", "count": 3}],
     "prompt": "a photo of two squares"},
]


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_writer_produces_genevals_layout_from_its_metadata(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)
    write_geneval_folder(tmp_path / "out", METADATA, images)
    expected = [f"{k:05d}/{name}" for k in range(2) for name in
                ["grid.png", "metadata.jsonl", *(f"samples/{j:04d}.png" for j in range(4))]]
    assert _tree(tmp_path / "out") == expected
    for k, entry in enumerate(METADATA):
        with open(tmp_path / "out" / f"{k:05d}" / "metadata.jsonl") as handle:
            assert json.load(handle) == entry  # GenEval's evaluator reads it with json.load
        for j in range(4):
            stored = np.asarray(Image.open(tmp_path / "out" / f"{k:05d}" / "samples" / f"{j:04d}.png"))
            np.testing.assert_array_equal(stored, images[4 * k + j])
    with pytest.raises(ValueError, match="do not split evenly"):
        write_geneval_folder(tmp_path / "bad", METADATA, images[:7])


def test_metadata_needs_a_prompt_per_line(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(m) for m in METADATA) + "\n")
    assert read_metadata(path) == METADATA
    path.write_text(json.dumps({"tag": "colors"}) + "\n")
    with pytest.raises(GenEvalFormatError, match="no 'prompt'"):
        read_metadata(path)


def _results(rows: list[tuple[str, str, list[bool]]]) -> list[dict]:
    out = []
    for tag, prompt, flags in rows:
        metadata = json.dumps({"tag": tag, "prompt": prompt})
        out += [{"filename": f"{prompt}/{j:04d}.png", "tag": tag, "prompt": prompt, "correct": c, "reason": "",
                 "metadata": metadata} for j, c in enumerate(flags)]
    return out


# Hand-made: 20 images over 7 prompts, colours listed first (GenEval keeps first-appearance order).
HAND_MADE = [
    ("colors", "E", [True, True, True]),
    ("single_object", "A", [True, True, False, True]),
    ("single_object", "B", [False, False, False, False]),
    ("two_object", "C", [True, False]),
    ("counting", "D", [False]),
    ("position", "F", [False, False]),
    ("color_attr", "G", [True, False, False, False]),
]


def test_summary_reproduces_genevals_scoring_by_hand():
    summary = summarize_results(_results(HAND_MADE))
    assert summary["num_images"] == 20 and summary["num_prompts"] == 7
    assert summary["correct_images"] == pytest.approx(8 / 20)
    assert summary["correct_prompts"] == pytest.approx(4 / 7)  # A, C, E, G have a correct image
    assert list(summary["tasks"]) == ["colors", "single_object", "two_object", "counting", "position", "color_attr"]
    scores = {tag: task["score"] for tag, task in summary["tasks"].items()}
    assert scores == pytest.approx({"colors": 1.0, "single_object": 3 / 8, "two_object": 0.5, "counting": 0.0,
                                    "position": 0.0, "color_attr": 0.25})
    assert summary["tasks"]["single_object"] == {"score": 0.375, "correct": 3, "total": 8}
    # Overall is the mean of the task scores (2.125 / 6), not the share of correct images (0.4).
    assert summary["overall"] == pytest.approx(2.125 / 6)


def test_geneval_summary_command_writes_json_with_provenance(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in _results(HAND_MADE)) + "\n")
    assert main(["evaluate", "geneval-summary", str(results)]) == 0
    printed = capsys.readouterr().out
    assert "single_object    = 37.50% (3 / 8)" in printed and "Overall score (avg. over tasks): 0.35417" in printed
    document = json.loads((tmp_path / "results.eval-geneval.json").read_text())
    assert document["overall"] == pytest.approx(2.125 / 6)
    assert document["provenance"]["settings"]["results"]["sha256"]
    results.write_text(json.dumps({"tag": "colors", "correct": 1, "metadata": "{}"}) + "\n")
    assert main(["evaluate", "geneval-summary", str(results)]) == 2
    assert "expected true or false" in capsys.readouterr().err


def test_sample_t2i_writes_the_geneval_layout(tmp_path):
    from aligntok.config import load_config
    from aligntok.diffusion.t2i_training import T2ITrainConfig, train_t2i
    from aligntok.models.text import build_tiny_text_encoders
    from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig
    from aligntok.models.word_tokenizer import caption_words
    from aligntok.standins.text import builtin_captions

    cfg = TokenizerConfig(encoder="random", latent_channels=4, adapter_hidden=8)
    cfg.random_encoder.hidden_size, cfg.random_encoder.patch_size, cfg.random_encoder.num_layers = 16, 16, 1
    cfg.decoder.base_channels, cfg.decoder.channel_mult, cfg.decoder.norm_groups = 4, [1, 1, 1, 1, 1], 4
    cfg.decoder.layers_per_block = 1
    torch.manual_seed(0)
    AlignTokTokenizer.from_config(cfg).save_pretrained(tmp_path / "tok")
    build_tiny_text_encoders(tmp_path / "text", caption_words(builtin_captions(50)), width=16, layers=1, heads=2)
    t2i = load_config(T2ITrainConfig, Path(__file__).resolve().parents[1] / "configs" / "t2i" / "tiny.yaml", [
        f"data.tokenizer={tmp_path / 'tok'}", "data.build_tokenizer=null", f"text.encoder={tmp_path / 'text' / 't5'}",
        "data.resolution=32", "data.builtin_size=8", "data.stats_samples=8", "train.steps=1", "train.batch_size=4",
        "train.ckpt_every=1", "validation.every=0", "optim.warmup_steps=1"])
    model = train_t2i(t2i, tmp_path / "run")
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text("\n".join(json.dumps(m) for m in METADATA) + "\n")
    out = tmp_path / "geneval"
    common = ["sample-t2i", "--model", str(model), "--tokenizer", str(tmp_path / "tok"), "--steps", "1", "--out"]
    assert main([*common, str(out), "--geneval", str(metadata), "--samples-per-prompt", "2"]) == 0
    layout = [p for p in _tree(out) if p != "sampling.json"]
    assert layout == [f"{k:05d}/{name}" for k in range(2) for name in
                      ["grid.png", "metadata.jsonl", "samples/0000.png", "samples/0001.png"]]
    assert json.loads((out / "00001" / "metadata.jsonl").read_text()) == METADATA[1]
    # Sample j of prompt k is prompt index k * n + j of the flat run: the same pixels.
    flat = tmp_path / "flat"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(m["prompt"] for m in METADATA for _ in range(2)) + "\n")
    assert main([*common, str(flat), "--prompts", str(prompts)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out / "00001" / "samples" / "0000.png")),
                                  np.asarray(Image.open(flat / "00002.png")))
    # Sampling fewer into the same folders leaves none of the earlier samples for GenEval or evaluate t2i to read.
    metadata.write_text(json.dumps(METADATA[0]) + "\n")
    assert main([*common, str(out), "--geneval", str(metadata), "--samples-per-prompt", "1"]) == 0
    assert [p for p in _tree(out) if p != "sampling.json"] == ["00000/grid.png", "00000/metadata.jsonl", "00000/samples/0000.png"]
    prompts.write_text(METADATA[0]["prompt"] + "\n")
    assert main([*common, str(flat), "--prompts", str(prompts)]) == 0
    assert sorted(p.name for p in flat.glob("*.png")) == ["00000.png", "grid.png"]
