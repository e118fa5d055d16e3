"""The scene CLIP: a CLIP directory trained on renders, usable by evaluate t2i, retrieving held-out pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from aligntok.cli import main
from aligntok.data.scenes import make_scene_graph, render_scene_graph
from aligntok.standins.scene_clip import (
    SceneCLIPConfig,
    retrieval_accuracy,
    train_scene_clip,
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """Trained once (about 15 s on one core); tests only read the directory."""
    config = SceneCLIPConfig(steps=150, train_images=800, prompt_scenes=200)
    return train_scene_clip(tmp_path_factory.mktemp("clip") / "clip", config)


def test_held_out_pairs_are_retrieved_far_above_chance(clip_dir):
    assert retrieval_accuracy(clip_dir, num=32) > 0.25  # chance: 1 / 32


def test_evaluate_t2i_scores_matching_captions_above_shuffled_ones(clip_dir, tmp_path):
    graphs = [make_scene_graph(5, 10**5 + i) for i in range(12)]
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, graph in enumerate(graphs):
        render_scene_graph(graph, 64).save(folder / f"{i:05d}.png")
    captions = [g.caption for g in graphs]
    scores = {}
    for name, order in (("matched", captions), ("shuffled", captions[6:] + captions[:6])):
        (tmp_path / f"{name}.txt").write_text("\n".join(order) + "\n")
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", "t2i", "--samples", str(folder), "--prompts", str(tmp_path / f"{name}.txt"),
                     "--clip", str(clip_dir), "--out", str(out)]) == 0
        scores[name] = json.loads(out.read_text())["clip_score"]
    assert scores["matched"] > scores["shuffled"] + 5, scores
    assert np.asarray(Image.open(folder / "00000.png")).shape == (64, 64, 3)
