"""builtin:scenes (scene graphs, captions, rendering) and caption-aware horizontal flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aligntok.data import build_dataset
from aligntok.data.builtin import swap_left_right
from aligntok.data.images import should_flip
from aligntok.data.scenes import (
    SceneGraph,
    SceneObject,
    make_scene_graph,
    relation,
    render_scene_graph,
)


def test_scenes_are_pure_functions_of_seed_and_index():
    assert make_scene_graph(0, 5) == make_scene_graph(0, 5)
    assert make_scene_graph(0, 5) != make_scene_graph(1, 5)
    counts = {len(make_scene_graph(0, i).objects) for i in range(60)}
    assert counts == {1, 2, 3, 4}


def test_caption_follows_the_scene_graph():
    a = SceneObject("circle", "red", (0.2, 0.5), 0.1)
    b = SceneObject("square", "blue", (0.8, 0.45), 0.1)
    graph = SceneGraph((a, b), "plain", ("gray",), (0.0, 0.0), 0.0)
    assert graph.caption == "a red circle left of a blue square on a plain gray background"
    assert relation(b, a) == "right of"
    assert relation(SceneObject("cross", "red", (0.5, 0.1), 0.1), a) == "above"
    three = SceneGraph((a, a, b), "gradient", ("gray", "beige"), (0.0,) * 3, 0.0)
    assert three.caption == "two red circles and a blue square on a gray to beige gradient background"
    assert three.counts() == {("red", "circle"): 2, ("blue", "square"): 1}
    for i in range(40):  # every object's colour and kind is named
        g = make_scene_graph(3, i)
        assert all(o.colour in g.caption and o.kind in g.caption for o in g.objects)


def test_objects_do_not_overlap_and_stay_inside():
    for i in range(50):
        objs = make_scene_graph(0, i).objects
        assert all(0 <= v <= 1 for o in objs for v in o.box)
        for j, p in enumerate(objs):
            for q in objs[j + 1:]:
                assert np.hypot(p.center[0] - q.center[0], p.center[1] - q.center[1]) > p.radius + q.radius


def test_flipping_swaps_left_and_right_in_caption_and_graph():
    swapped = 0
    for i in range(80):
        g = make_scene_graph(0, i)
        f = g.flipped()
        assert f.caption == swap_left_right(g.caption)
        swapped += f.caption != g.caption
        assert [o.center[0] for o in f.objects] == pytest.approx([1 - o.center[0] for o in g.objects])
    assert swapped > 20
    # the mirrored graph renders as the mirrored image
    g = make_scene_graph(0, 7)
    direct = np.asarray(render_scene_graph(g.flipped(), 64), np.float32)
    mirrored = np.asarray(render_scene_graph(g, 64), np.float32)[:, ::-1]
    assert np.abs(direct - mirrored).mean() < 2.0


def test_swap_left_right_words_only():
    assert swap_left_right("a circle at the top left, right of a leftover") == "a circle at the top right, left of a leftover"


@pytest.mark.parametrize("name", ["scenes", "shapes"])
def test_dataset_flips_swap_left_right_in_builtin_captions(name):
    plain = build_dataset(f"builtin:{name}", 32, seed=0, builtin_size=64)
    flipping = build_dataset(f"builtin:{name}", 32, hflip=True, seed=0, builtin_size=64)
    checked = 0
    for i in range(64):
        a, b = plain[i], flipping[i]
        if should_flip(0, 0, i):
            assert torch.equal(b["image"], a["image"].flip(-1))
            assert b["caption"] == swap_left_right(a["caption"])
            checked += ("left" in a["caption"]) or ("right" in a["caption"])
        else:
            assert b["caption"] == a["caption"]
    assert checked > 3


def test_folder_captions_are_not_rewritten(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a dog left of a cat")
    ds = build_dataset(str(tmp_path), 8, hflip=True, seed=0)
    keys = [k for k in range(16) if should_flip(0, k, 0)]
    from aligntok.data.images import SampleKey

    assert ds[SampleKey(0, keys[0])]["caption"] == "a dog left of a cat"
