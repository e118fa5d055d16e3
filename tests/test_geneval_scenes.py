"""The miniature GenEval's prompts, GenEval's scoring rules, and scenes that satisfy each prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aligntok.data.scenes import render_scene_graph
from aligntok.eval.geneval import summarize_results
from aligntok.eval.geneval_scenes import (
    Detection,
    create_prompts,
    judge,
    oracle_detections,
    relative_position,
    scene_for_prompt,
    score_images,
)


def test_prompts_follow_genevals_schema_task_by_task():
    prompts = create_prompts(seed=43, n=6)
    tags = [p["tag"] for p in prompts]
    assert tags[:4] == ["single_object"] * 4  # every kind once
    assert set(tags) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert len({json.dumps(p, sort_keys=True) for p in prompts}) == len(prompts)  # de-duplicated
    for p in prompts:
        if p["tag"] == "counting":
            (inc,), (exc,) = p["include"], p["exclude"]
            assert inc["class"] == exc["class"] and exc["count"] == inc["count"] + 1 and 2 <= inc["count"] <= 4
        if p["tag"] == "position":
            target, subject = p["include"]
            assert "position" not in target and subject["position"][1] == 0
            assert p["prompt"] == f"a {subject['class']} {subject['position'][0]} a {target['class']}"
        if p["tag"] == "color_attr":
            assert p["include"][0]["color"] != p["include"][1]["color"]
    assert create_prompts(seed=43, n=6) == prompts and create_prompts(seed=1, n=6) != prompts


def test_relative_position_is_genevals_rule():
    a, b = (0.0, 0.0, 1.0, 1.0), (3.0, 0.0, 4.0, 1.0)
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    assert relative_position((0, 0, 1, 1), (0, 3, 1, 4)) == {"above"}
    assert relative_position((0, 0, 1, 1), (3, 3, 4, 4)) == {"left of", "above"}  # diagonal: dx = dy = 0.8 > 0.5
    # Offset 1.1 between boxes of width 5: shrunk by 0.1 * 10 = 1.0 to 0.1, a component of 0.09 < 0.5.
    assert relative_position((0, 0, 5, 1), (1.1, 0, 6.1, 1)) == set()
    assert relative_position(a, a) == set()


def _det(kind, colour, x, y, confidence=1.0, r=0.1):
    return Detection(kind, colour, (x - r, y - r, x + r, y + r), confidence)


def test_judge_applies_genevals_thresholds_and_clauses():
    two = {"tag": "counting", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}],
           "prompt": "two circles"}
    assert judge([_det("circle", "red", 0.2, 0.2), _det("circle", "blue", 0.8, 0.8)], two)[0]
    three = [_det("circle", "red", 0.2, 0.2), _det("circle", "blue", 0.8, 0.8), _det("circle", "red", 0.5, 0.5)]
    correct, reason = judge(three, two)
    assert not correct and "expected circle<3, found 3" in reason
    # Counting keeps only confidences above 0.9: a third circle at 0.8 does not count (and 0.9 itself is out).
    assert judge([*three[:2], _det("circle", "red", 0.5, 0.5, 0.8)], two)[0]
    assert not judge([three[0], _det("circle", "red", 0.5, 0.5, 0.9)], two)[0]
    red = {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}], "prompt": "a red square"}
    # Colour is checked on the most confident square only.
    assert not judge([_det("square", "blue", 0.2, 0.2, 0.9), _det("square", "red", 0.8, 0.8, 0.5)], red)[0]
    assert judge([_det("square", "red", 0.2, 0.2, 0.9), _det("square", "blue", 0.8, 0.8, 0.5)], red)[0]
    assert not judge([_det("square", "red", 0.2, 0.2, 0.3)], red)[0]  # threshold 0.3 is exclusive
    left = {"tag": "position", "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1,
            "position": ["left of", 0]}], "prompt": "a circle left of a square"}
    assert judge([_det("circle", "red", 0.2, 0.5), _det("square", "red", 0.8, 0.5)], left)[0]
    correct, reason = judge([_det("circle", "red", 0.8, 0.5), _det("square", "red", 0.2, 0.5)], left)
    assert not correct and "left of" in reason
    assert "no target" in judge([_det("circle", "red", 0.2, 0.5)], left)[1]


def test_scenes_made_for_prompts_pass_with_the_oracle_and_fail_other_prompts():
    prompts = create_prompts(seed=0, n=8)
    graphs = [scene_for_prompt(p, seed=0, index=i) for i, p in enumerate(prompts)]
    rows = score_images([oracle_detections(g) for g in graphs], prompts)
    summary = summarize_results(rows)
    assert summary["overall"] == 1.0, [r["reason"] for r in rows if not r["correct"]]
    # The same scenes judged against the next prompt of the same task: mostly wrong.
    shifted = [prompts[(i + 1) % len(prompts)] for i in range(len(prompts))]
    assert summarize_results(score_images([oracle_detections(g) for g in graphs], shifted))["correct_images"] < 0.5
    image = np.asarray(render_scene_graph(graphs[-1], 64))
    assert image.shape == (64, 64, 3)
    assert scene_for_prompt(prompts[5], 0, 5) == graphs[5]
    with pytest.raises(ValueError, match="1..9"):
        scene_for_prompt({"prompt": "x", "include": [{"class": "circle", "count": 10}]}, 0, 0)
