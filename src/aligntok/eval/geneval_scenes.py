"""A miniature GenEval on ``builtin:scenes``: GenEval's six tasks, metadata schema and scoring rules, with
the object detector swapped for any callable that returns detections (a stand-in judge, or the oracle).

* :func:`create_prompts` writes GenEval-schema metadata (``tag``, ``include``/``exclude`` clauses with
  ``class``, ``count``, ``color``, ``position``) over the scene kinds and GenEval's ten colours, task by task
  as GenEval's ``prompts/create_prompts.py`` builds them: every kind once for single_object, ``n`` draws for
  each other task (counting 2..4 with the exclude clause count + 1; position's include lists the target
  first and the subject with ``[relation, 0]``; no repeated colour in color_attr), de-duplicated. The prompt
  wording follows the scenes' captions ("a red circle left of a blue square"), without GenEval's "a photo of".
* :func:`judge` applies GenEval's ``evaluate_images.py`` rules to one image's detections: confidence above
  0.3 (0.9 for counting), at most 16 per class, no NMS (GenEval's default ``max_overlap`` 1.0); include
  clauses AND-ed, exclude clauses OR-ed; colour and position checked on the most confident detections only;
  positions with :func:`relative_position` (threshold 0.1).
* :func:`scene_for_prompt` draws a scene graph that satisfies a prompt, whose render is the judge's ceiling
  image; :func:`oracle_detections` are a scene graph's true objects as detections (confidence 1).
* :func:`score_images` returns rows in GenEval's ``results.jsonl`` schema, so
  :func:`aligntok.eval.geneval.summarize_results` summarises miniature and real runs alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from aligntok.data.scenes import (
    SCENE_COLOURS,
    SCENE_KINDS,
    SceneGraph,
    SceneObject,
    _plural,
)

COLOURS: tuple[str, ...] = tuple(SCENE_COLOURS)  #: GenEval's ten colours, in its order
POSITIONS = ("left of", "right of", "above", "below")
THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_THRESHOLD = 0.3, 0.9, 16, 0.1  #: GenEval's defaults
_NUMBERS = {2: "two", 3: "three", 4: "four"}


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object: class (kind), colour, box (x0, y0, x1, y1) in any consistent unit, confidence."""

    kind: str
    colour: str
    box: tuple[float, float, float, float]
    confidence: float


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def create_prompts(seed: int = 43, n: int = 10, kinds: Sequence[str] = SCENE_KINDS) -> list[dict[str, Any]]:
    """GenEval-schema metadata for the six tasks over ``kinds`` (see the module doc); seed 43 is GenEval's."""
    rng = np.random.default_rng(seed)
    kinds = list(kinds)
    pick = lambda k: [kinds[i] for i in rng.choice(len(kinds), size=k, replace=False)]
    out: list[dict[str, Any]] = [
        {"tag": "single_object", "include": [{"class": k, "count": 1}], "prompt": _article(k)}
        for k in pick(len(kinds))
    ]
    for _ in range(n):
        a, b = pick(2)
        out.append({"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                    "prompt": f"{_article(a)} and {_article(b)}"})
    for _ in range(n):
        (k,), num = pick(1), int(rng.integers(2, 4, endpoint=True))
        out.append({"tag": "counting", "include": [{"class": k, "count": num}], "exclude": [{"class": k, "count": num + 1}],
                    "prompt": f"{_NUMBERS[num]} {_plural(k, num)}"})
    for _ in range(n):
        (k,), colour = pick(1), COLOURS[int(rng.integers(len(COLOURS)))]
        out.append({"tag": "colors", "include": [{"class": k, "count": 1, "color": colour}], "prompt": f"{_article(colour)} {k}"})
    for _ in range(n):
        a, b = pick(2)
        rel = POSITIONS[int(rng.integers(len(POSITIONS)))]
        out.append({"tag": "position", "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                    "prompt": f"{_article(a)} {rel} {_article(b)}"})
    for _ in range(n):
        a, b = pick(2)
        ca, cb = (COLOURS[i] for i in rng.choice(len(COLOURS), size=2, replace=False))
        out.append({"tag": "color_attr", "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                    "prompt": f"{_article(ca)} {a} and {_article(cb)} {b}"})
    unique, seen = [], set()
    for entry in out:
        key = json.dumps(entry, sort_keys=True)
        if key not in seen:
            unique.append(entry)
            seen.add(key)
    return unique


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Where box ``a`` lies relative to box ``b`` by GenEval's rule: the centre offset, shrunk per axis by
    ``threshold * (size_a + size_b)``, normalised by the raw offset's length; a component beyond 0.5 names
    the relation (y grows downwards). Overlapping centres give the empty set."""
    boxes = np.asarray([box_a[:4], box_b[:4]], np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {name for name, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                     ("below", dy > 0.5)) if holds}


def _kept(detections: Sequence[Detection], tag: str) -> dict[str, list[Detection]]:
    """Per class, detections above the task's threshold, most confident first, at most MAX_OBJECTS."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    by_class: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.confidence):
        if det.confidence > threshold and len(by_class.get(det.kind, [])) < MAX_OBJECTS:
            by_class.setdefault(det.kind, []).append(det)
    return by_class


def judge(detections: Sequence[Detection], metadata: dict[str, Any]) -> tuple[bool, str]:
    """(correct, reason) of one image under GenEval's rules (module doc)."""
    objects = _kept(detections, metadata["tag"])
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = objects.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                hits = sum(d.colour == req["color"] for d in found)
                if hits < count:
                    matched = False
                    reasons.append(f"expected {req['color']} {name}>={count}, found {hits} {req['color']}")
            if "position" in req and matched:
                relation, target = req["position"]
                if groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                elif any(relation not in relative_position(d.box, t.box) for d in found for t in groups[target]):
                    matched = False
                    reasons.append(f"expected {name} {relation} target")
        correct = correct and matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        if len(objects.get(req["class"], [])) >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(objects[req['class']])}")
    return correct, "\n".join(reasons)


def oracle_detections(graph: SceneGraph) -> list[Detection]:
    """A scene graph's objects as detections with confidence 1 (boxes in fractions of the image side)."""
    return [Detection(o.kind, o.colour, o.box, 1.0) for o in graph.objects]


#: (subject's, target's) place along the shared row ("x") or column ("y") for each relation
_ROW_OR_COLUMN = {"left of": ((0, 2), "x"), "right of": ((2, 0), "x"), "above": ((0, 2), "y"), "below": ((2, 0), "y")}


def scene_for_prompt(metadata: dict[str, Any], seed: int, index: int) -> SceneGraph:
    """A random scene graph (pure function of the arguments) holding exactly the prompt's included objects,
    coloured as asked (other colours random), one per 3x3 cell; a position prompt's subject sits two cells
    from its target on one row or column. Raises ValueError for metadata outside GenEval's schema."""
    from aligntok.data.scenes import _BACKDROPS, _MIN_CONTRAST

    rng = np.random.default_rng([0x6E4E7A1, seed, index])
    reqs = metadata.get("include", [])
    total = sum(int(r["count"]) for r in reqs)
    if not reqs or total > 9:
        raise ValueError(f"prompt {metadata.get('prompt')!r}: needs 1..9 included objects, has {total}")
    if any("position" in r for r in reqs):
        # GenEval's position prompts: [target, subject with (relation, 0)], one object each.
        if len(reqs) != 2 or total != 2 or "position" not in reqs[1] or reqs[1]["position"][1] != 0:
            raise ValueError(f"prompt {metadata.get('prompt')!r}: position clauses must follow GenEval's schema")
        (subject_at, target_at), axis = _ROW_OR_COLUMN[reqs[1]["position"][0]]
        line = int(rng.integers(3))
        cells = [line * 3 + at if axis == "x" else at * 3 + line for at in (target_at, subject_at)]
    else:
        cells = [int(c) for c in rng.permutation(9)[:total]]
    objects, free = [], iter(cells)
    for req in reqs:
        for _ in range(int(req["count"])):
            colour = req.get("color") or COLOURS[int(rng.integers(len(COLOURS)))]
            objects.append(SceneObject(req["class"], colour, _cell_center(next(free), rng), float(rng.uniform(0.07, 0.12))))
    used = np.asarray([SCENE_COLOURS[o.colour] for o in objects], np.float32)
    names = [n for n, rgb in _BACKDROPS.items()
             if np.linalg.norm(used - np.asarray(rgb, np.float32), axis=1).min() >= _MIN_CONTRAST] or ["gray"]
    return SceneGraph(tuple(objects), "plain", (names[int(rng.integers(len(names)))],),
                      tuple(float(r) for r in rng.uniform(-0.3, 0.3, len(objects))), float(rng.uniform(0, 2 * math.pi)))


def _cell_center(cell: int, rng: np.random.Generator) -> tuple[float, float]:
    jitter = rng.uniform(-0.04, 0.04, 2)
    return ((cell % 3 + 0.5) / 3 + float(jitter[0]), (cell // 3 + 0.5) / 3 + float(jitter[1]))


def score_images(detections: Sequence[Sequence[Detection]], metadata: Sequence[dict[str, Any]],
                 filenames: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """GenEval ``results.jsonl`` rows of images whose detections and prompt metadata are given pairwise."""
    if len(detections) != len(metadata):
        raise ValueError(f"{len(detections)} detection lists for {len(metadata)} prompts")
    rows = []
    for i, (dets, meta) in enumerate(zip(detections, metadata, strict=True)):
        correct, reason = judge(dets, meta)
        rows.append({"filename": filenames[i] if filenames else str(i), "tag": meta["tag"], "prompt": meta["prompt"],
                     "correct": correct, "reason": reason, "metadata": json.dumps(meta),
                     "details": json.dumps({d.kind: [list(d.box)] for d in dets})})
    return rows


Detector = Callable[[np.ndarray], list[list[Detection]]]  #: uint8 (N, H, W, 3) images -> detections per image


def prompt_renders(metadata: Sequence[dict[str, Any]], seed: int, resolution: int, samples_per_prompt: int = 1) -> np.ndarray:
    """Real renders of scenes made for each prompt (:func:`scene_for_prompt`), uint8 (N * n, R, R, 3),
    prompt k's n images consecutive (sample j is scene index ``k * n + j``)."""
    from aligntok.data.scenes import render_scene_graphs

    n = samples_per_prompt
    return render_scene_graphs([scene_for_prompt(m, seed, k * n + j) for k, m in enumerate(metadata) for j in range(n)],
                               resolution)


def reconstruct(tokenizer, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """``tokenizer``'s reconstructions (encode, decode) of uint8 (N, H, W, 3) images, uint8 again: the images a
    generator on that tokenizer could at best produce (its ceiling)."""
    import torch

    from aligntok.eval.images import from_uint8, nhwc_to_tensor, to_uint8_nhwc

    device = next(tokenizer.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = from_uint8(nhwc_to_tensor(images[start : start + batch_size])).to(device)
            out.append(to_uint8_nhwc(tokenizer.decode(tokenizer.encode(x))))
    return np.concatenate(out)


def miniature_geneval(detect: Detector, images: np.ndarray, metadata: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """GenEval's summary (:func:`aligntok.eval.geneval.summarize_results`) of ``images`` (prompt k's
    ``len(images) // len(metadata)`` images consecutive) judged with ``detect``'s detections."""
    from aligntok.eval.geneval import summarize_results

    if len(images) % len(metadata):
        raise ValueError(f"{len(images)} images do not split evenly over {len(metadata)} prompts")
    n = len(images) // len(metadata)
    return summarize_results(score_images(detect(images), [m for m in metadata for _ in range(n)]))
