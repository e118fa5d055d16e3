"""``builtin:scenes``: one to four coloured shapes with counts and relative positions, for text-to-image.

Each scene is a pure function of (seed, index), independent of resolution, and carries its **scene
graph** (objects with kind, colour, centre, radius and box in fractions of the image side) as ground
truth for evaluation. The caption is generated from the graph alone, GenEval-style:

* one object: ``"a red circle at the top left on a plain gray background"``;
* two objects: their relation, ``"a red circle left of a blue square on ..."`` (the axis of larger
  separation decides left of / right of / above / below, as GenEval's rule does);
* three or four: the counted groups, ``"two red circles and a blue square on ..."``.

Objects sit in distinct cells of a 3x3 grid with jitter, so they never overlap. The default kinds are four
that survive a tiny 64-px tokenizer best (circle, square, triangle, cross); colours are GenEval's ten. The
mirrored scene (:meth:`SceneGraph.flipped`) has the mirrored caption: "left" and "right" exchanged, which
is what the dataset's horizontal flip does to the caption. Rendering reuses ``builtin:shapes``' renderer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from aligntok.data.builtin import (
    SHAPE_NAMES,
    ShapeLayer,
    render_layers,
    swap_left_right,
)
from aligntok.data.images import IndexedImageDataset

SCENE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SCENE_COLOURS: dict[str, tuple[int, int, int]] = {  # GenEval's ten colours
    "red": (215, 40, 40), "orange": (245, 135, 30), "yellow": (240, 215, 40), "green": (45, 165, 60),
    "blue": (40, 80, 220), "purple": (135, 60, 195), "pink": (240, 125, 185), "brown": (125, 80, 40),
    "black": (20, 20, 20), "white": (245, 245, 245),
}
_BACKDROPS: dict[str, tuple[int, int, int]] = {  # named backgrounds, none an object colour
    "gray": (128, 128, 128), "light gray": (200, 200, 200), "dark gray": (70, 70, 70),
    "beige": (225, 210, 170), "teal": (40, 140, 140), "navy": (25, 30, 90),
}
_NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
_MIN_CONTRAST = 90.0
_STREAM_TAG = 0x5CE7E  # own RNG stream, never shared with builtin:shapes or the flips
_NOISE_GRID = 8


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object of a scene graph (positions and sizes are fractions of the image side; y grows down)."""

    kind: str
    colour: str
    center: tuple[float, float]
    radius: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1)."""
        x, y = self.center
        return (x - self.radius, y - self.radius, x + self.radius, y + self.radius)


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``: "left of", "right of", "above" or "below" (larger offset wins)."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _plural(kind: str, count: int) -> str:
    return kind if count == 1 else kind + ("es" if kind.endswith(("s", "sh", "ch", "x")) else "s")


def _position_words(center: tuple[float, float]) -> str:
    column = "left" if center[0] < 1 / 3 else "right" if center[0] > 2 / 3 else ""
    row = "top" if center[1] < 1 / 3 else "bottom" if center[1] > 2 / 3 else ""
    return "in the center" if not (row or column) else f"at the {' '.join(w for w in (row, column) if w)}"


@dataclasses.dataclass(frozen=True)
class SceneGraph:
    """A whole scene: objects (back to front), background, and the caption derived from them."""

    objects: tuple[SceneObject, ...]
    background: str  #: plain | gradient
    background_names: tuple[str, ...]
    rotations: tuple[float, ...]  #: per object, radians (rendering only)
    background_angle: float

    @property
    def caption(self) -> str:
        objs = self.objects
        if len(objs) == 1:
            subject = f"a {objs[0].colour} {objs[0].kind} {_position_words(objs[0].center)}"
        elif len(objs) == 2:
            a, b = objs
            subject = f"a {a.colour} {a.kind} {relation(a, b)} a {b.colour} {b.kind}"
        else:
            groups: dict[tuple[str, str], int] = {}
            for obj in objs:
                groups[(obj.colour, obj.kind)] = groups.get((obj.colour, obj.kind), 0) + 1
            parts = [f"{_NUMBERS[n]} {colour} {_plural(kind, n)}" for (colour, kind), n in groups.items()]
            subject = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
        backdrop = (f"plain {self.background_names[0]}" if self.background == "plain"
                    else f"{' to '.join(self.background_names)} gradient")
        return f"{subject} on a {backdrop} background"

    def counts(self) -> dict[tuple[str, str], int]:
        """Objects per (colour, kind): the ground truth of counting prompts."""
        out: dict[tuple[str, str], int] = {}
        for obj in self.objects:
            out[(obj.colour, obj.kind)] = out.get((obj.colour, obj.kind), 0) + 1
        return out

    def flipped(self) -> SceneGraph:
        """The horizontally mirrored scene (x -> 1 - x)."""
        objects = tuple(dataclasses.replace(o, center=(1 - o.center[0], o.center[1])) for o in self.objects)
        return dataclasses.replace(self, objects=objects, rotations=tuple(-r for r in self.rotations),
                                   background_angle=math.pi - self.background_angle)

    def as_dict(self) -> dict:
        """JSON-ready ground truth."""
        return {"caption": self.caption, "background": self.background, "background_names": list(self.background_names),
                "objects": [{"kind": o.kind, "colour": o.colour, "center": list(o.center), "radius": o.radius,
                             "box": list(o.box)} for o in self.objects]}


def make_scene_graph(seed: int, index: int, kinds: tuple[str, ...] = SCENE_KINDS, max_objects: int = 4) -> SceneGraph:
    """The scene of image ``index`` for ``seed``: a pure function of its arguments."""
    if not kinds or any(k not in SHAPE_NAMES for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {', '.join(SHAPE_NAMES)}, got {kinds}")
    if not 1 <= max_objects <= 4:
        raise ValueError(f"max_objects must be in 1..4, got {max_objects}")
    mask = (1 << 64) - 1
    rng = np.random.default_rng([_STREAM_TAG, seed & mask, index & mask])
    count = int(rng.integers(1, max_objects + 1))
    cells = rng.permutation(9)[:count]
    colours = list(SCENE_COLOURS)
    # counting needs repeats: with 3-4 objects, half the scenes repeat one (colour, kind) group
    group = (colours[int(rng.integers(len(colours)))], kinds[int(rng.integers(len(kinds)))])
    repeat = count >= 3 and rng.random() < 0.5
    objects, rotations = [], []
    for i, cell in enumerate(cells):
        radius = float(rng.uniform(0.07, 0.12))  # fits its cell with the jitter: no overlap
        jitter = rng.uniform(-0.04, 0.04, 2)
        center = ((cell % 3 + 0.5) / 3 + float(jitter[0]), (cell // 3 + 0.5) / 3 + float(jitter[1]))
        if repeat and i < 2:
            colour, kind = group
        else:
            colour, kind = colours[int(rng.integers(len(colours)))], kinds[int(rng.integers(len(kinds)))]
        objects.append(SceneObject(kind, colour, center, radius))
        rotations.append(float(rng.uniform(-0.3, 0.3)))
    used = np.asarray([SCENE_COLOURS[o.colour] for o in objects], np.float32)
    names = [n for n, rgb in _BACKDROPS.items()
             if np.linalg.norm(used - np.asarray(rgb, np.float32), axis=1).min() >= _MIN_CONTRAST] or ["gray"]
    background = "gradient" if rng.random() < 0.3 and len(names) > 1 else "plain"
    picked = rng.permutation(len(names))[: 2 if background == "gradient" else 1]
    return SceneGraph(tuple(objects), background, tuple(names[int(i)] for i in picked), tuple(rotations),
                      float(rng.uniform(0, 2 * math.pi)))


@dataclasses.dataclass(frozen=True)
class _Backdrop:
    """The background fields builtin's renderer reads."""

    background: str
    background_colours: tuple[np.ndarray, ...]
    background_angle: float
    background_noise: np.ndarray


def render_scene_graph(graph: SceneGraph, resolution: int) -> Image.Image:
    """Draw ``graph`` at ``resolution`` x ``resolution`` with builtin:shapes' renderer."""
    backdrop = _Backdrop(graph.background, tuple(np.asarray(_BACKDROPS[n], np.float32) for n in graph.background_names),
                         graph.background_angle, np.zeros((_NOISE_GRID, _NOISE_GRID, 3), np.float32))
    layers = [
        ShapeLayer(kind=o.kind, center=o.center, radius=o.radius, rotation=r, colour_name=o.colour,
                   colour=np.asarray(SCENE_COLOURS[o.colour], np.float32), texture="solid", texture_angle=0.0,
                   texture_period=1.0, texture_noise=np.zeros((_NOISE_GRID, _NOISE_GRID), np.float32))
        for o, r in zip(graph.objects, graph.rotations, strict=True)
    ]
    return render_layers(backdrop, layers, resolution)


def render_scene_graphs(graphs: Sequence[SceneGraph], resolution: int) -> np.ndarray:
    """Every graph drawn by :func:`render_scene_graph`: uint8 (N, resolution, resolution, 3)."""
    return np.stack([np.asarray(render_scene_graph(graph, resolution)) for graph in graphs])


class ScenesDataset(IndexedImageDataset):
    """``builtin:scenes``: ``size`` multi-object scenes with captions; label = number of objects - 1."""

    def __init__(self, size: int, resolution: int, *, hflip: bool = False, seed: int = 0) -> None:
        if size <= 0:
            raise ValueError(f"builtin dataset size must be positive, got {size}")
        super().__init__("builtin:scenes", resolution, hflip=hflip, seed=seed)
        self.size = size
        self.class_names = ["one object", "two objects", "three objects", "four objects"]
        self.num_classes = 4

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> SceneGraph:
        return make_scene_graph(self.seed, index)

    def caption(self, index: int) -> str:
        return self.scene(index).caption

    def flip_caption(self, caption: str) -> str:
        return swap_left_right(caption)

    def load(self, index: int) -> tuple[Image.Image, int, str]:
        graph = self.scene(index)
        return render_scene_graph(graph, self.resolution), len(graph.objects) - 1, graph.caption
