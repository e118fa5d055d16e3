"""The built-in synthetic dataset, ``builtin:shapes``: no files, no downloads, any resolution.

Each image is a pure function of (seed, index): :func:`make_scene` draws the scene's parameters
(independent of resolution) and :func:`render_scene` draws it with PIL at any size. The class is the
kind of the main (largest) shape; pose, colour, texture and background are drawn independently of the
class, so a classifier has to learn shape, not colour. Some images hold a smaller distractor shape
of another kind behind the main one. Every image has a caption describing it, for text-to-image use.

Difficulty presets (:data:`DIFFICULTIES`) choose which textures, backgrounds and how often a distractor
appear: ``builtin:shapes`` is ``standard`` (everything), ``builtin:shapes-easy`` is ``easy`` (solid shapes
on plain or gradient backgrounds, no distractor), ``builtin:shapes-centered`` is ``centered`` (easy's large
shapes near the centre on a plain background: the demo's data). The class set and its balance are the same
in all.
Measured with one 8x8x16 tokenizer after 2 minutes of training on 2 CPU cores: solid shapes reconstruct at
23.5 dB, striped and checkered ones near 20.7 dB (their 3-13 px periods are finer than a latent cell);
noisy backgrounds and distractors cost about 1 dB each; the easy subset reaches 24.4 dB.
Shape masks are rendered supersampled and box-filtered (antialiased edges); textures are smooth
functions evaluated at the output resolution, so they do not alias.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np
import torch
from PIL import Image, ImageDraw

from aligntok.data.images import IndexedImageDataset

SHAPE_NAMES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "hexagon", "heart", "arrow", "crescent",
)
TEXTURES: tuple[str, ...] = ("solid", "striped", "checkered", "dotted", "speckled")
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noisy")

_BASE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "orange": (245, 135, 30), "yellow": (240, 215, 40), "green": (45, 165, 60),
    "cyan": (40, 200, 210), "blue": (40, 80, 220), "purple": (135, 60, 195), "pink": (240, 125, 185),
    "brown": (125, 80, 40), "white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20),
}
_FOREGROUND_COLOURS = tuple(_BASE_COLOURS)


def _shade(rgb: tuple[int, int, int], shade: str) -> np.ndarray:
    colour = np.asarray(rgb, dtype=np.float32)
    if shade == "dark":
        return colour * 0.45
    if shade == "light":
        return colour + (255.0 - colour) * 0.55
    return colour


# Background colours: every base colour in three shades ("white" and "black" only plain).
_BACKGROUND_COLOURS: tuple[tuple[str, np.ndarray], ...] = tuple(
    ((f"{shade} {name}".strip()), _shade(rgb, shade))
    for name, rgb in _BASE_COLOURS.items()
    for shade in (("",) if name in ("white", "black") else ("dark", "", "light"))
)
_BACKGROUND_NAMES = tuple(name for name, _ in _BACKGROUND_COLOURS)
_BACKGROUND_RGB = np.stack([rgb for _, rgb in _BACKGROUND_COLOURS])
_MIN_CONTRAST = 110.0  # RGB distance between a shape's colour and its background
_NOISE_GRID = 8  # side of the random grids upsampled into noise (fixed, so scenes ignore resolution)
_SCENE_STREAM_TAG = 0x5EED  # tags the scene RNG so it never shares a stream with the flip RNG


def _regular_polygon(corners: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(corners) / corners
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * radius


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)


def _heart(samples: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, samples, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], axis=1) / 16.5


# Unit-radius outlines (x right, y down) of the polygonal kinds; round kinds are drawn as ellipses.
_OUTLINES: dict[str, np.ndarray] = {
    "square": _regular_polygon(4, 1.0, math.pi / 4),
    "triangle": _regular_polygon(3, 1.1),
    "hexagon": _regular_polygon(6),
    "star": _star(),
    "cross": np.array([(-0.32, -1), (0.32, -1), (0.32, -0.32), (1, -0.32), (1, 0.32), (0.32, 0.32),
                       (0.32, 1), (-0.32, 1), (-0.32, 0.32), (-1, 0.32), (-1, -0.32), (-0.32, -0.32)]),
    "heart": _heart(),
    "arrow": np.array([(-1, -0.24), (0.15, -0.24), (0.15, -0.62), (1, 0), (0.15, 0.62), (0.15, 0.24),
                       (-1, 0.24)]),
}


@dataclass(frozen=True)
class ShapesDifficulty:
    """Which scene factors a builtin:shapes variant draws from (classes and poses never change)."""

    textures: tuple[str, ...]  #: textures of the main shape, a subset of TEXTURES
    backgrounds: tuple[str, ...]  #: background kinds, a subset of BACKGROUNDS
    distractor_probability: float  #: chance of a small shape of another class behind the main one
    radius: tuple[float, float] = (0.16, 0.40)  #: range of the main shape's radius (fraction of the side)
    #: None: the centre anywhere the shape fits; a number j: the image centre moved by at most j per axis
    center_jitter: float | None = None


#: Named difficulty presets; ``builtin:shapes`` is "standard", ``builtin:shapes-NAME`` is the preset NAME.
DIFFICULTIES: dict[str, ShapesDifficulty] = {
    "standard": ShapesDifficulty(TEXTURES, BACKGROUNDS, 0.3),
    "easy": ShapesDifficulty(("solid",), ("plain", "gradient"), 0.0),
    # A subset of "easy" (so its evaluation network applies): large shapes near the centre on a plain
    # background, pose (rotation) and colours still random. The demo's 8x8 latent keeps the class of 85%.
    "centered": ShapesDifficulty(("solid",), ("plain",), 0.0, radius=(0.30, 0.40), center_jitter=0.06),
}


def _difficulty(name: str) -> ShapesDifficulty:
    if name not in DIFFICULTIES:
        raise ValueError(f"unknown builtin:shapes difficulty {name!r}; available: {', '.join(DIFFICULTIES)}")
    return DIFFICULTIES[name]


@dataclass(frozen=True)
class ShapeLayer:
    """One shape in a scene, in resolution-free units (fractions of the image side)."""

    kind: str
    center: tuple[float, float]
    radius: float
    rotation: float  #: radians
    colour_name: str
    colour: np.ndarray  #: RGB in 0..255
    texture: str
    texture_angle: float
    texture_period: float  #: fraction of the image side
    texture_noise: np.ndarray  #: (_NOISE_GRID, _NOISE_GRID) in [0, 1], for "speckled"


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image, and its label and caption."""

    label: int
    main: ShapeLayer
    distractor: ShapeLayer | None
    background: str
    background_names: tuple[str, ...]
    background_colours: tuple[np.ndarray, ...]
    background_angle: float
    background_noise: np.ndarray  #: (_NOISE_GRID, _NOISE_GRID, 3) in [-1, 1], for "noisy"
    caption: str


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _contrasting(rng: np.random.Generator, colour: np.ndarray, exclude: str = "") -> tuple[str, np.ndarray]:
    """A jittered background colour far enough from ``colour`` (and not named ``exclude``)."""
    far = np.linalg.norm(_BACKGROUND_RGB - colour, axis=1) >= _MIN_CONTRAST
    options = [i for i in np.flatnonzero(far) if _BACKGROUND_NAMES[i] != exclude]
    choice = _pick(rng, options)
    rgb = np.clip(_BACKGROUND_RGB[choice] + rng.uniform(-12, 12, 3), 0, 255).astype(np.float32)
    return _BACKGROUND_NAMES[choice], rgb


def _make_layer(rng: np.random.Generator, kind: str, radius: float, center: tuple[float, float],
                texture: str) -> ShapeLayer:
    colour_name = _pick(rng, _FOREGROUND_COLOURS)
    colour = np.clip(np.asarray(_BASE_COLOURS[colour_name], np.float32) + rng.uniform(-15, 15, 3), 0, 255)
    return ShapeLayer(
        kind=kind, center=center, radius=radius, rotation=float(rng.uniform(0, 2 * math.pi)),
        colour_name=colour_name, colour=colour.astype(np.float32), texture=texture,
        texture_angle=float(rng.uniform(0, math.pi)), texture_period=radius * float(rng.uniform(0.3, 0.5)),
        texture_noise=rng.random((_NOISE_GRID, _NOISE_GRID)).astype(np.float32),
    )


def _size_word(radius: float) -> str:
    return "small" if radius < 0.22 else "medium" if radius < 0.31 else "large"


def swap_left_right(caption: str) -> str:
    """The caption of the horizontally mirrored image: "left" and "right" exchanged."""
    return re.sub(r"\b(left|right)\b", lambda m: "right" if m.group(1) == "left" else "left", caption)


def _position_words(center: tuple[float, float]) -> str:
    column = "left" if center[0] < 1 / 3 else "right" if center[0] > 2 / 3 else ""
    row = "top" if center[1] < 1 / 3 else "bottom" if center[1] > 2 / 3 else ""
    if not (row or column):
        return "in the center"
    return f"at the {' '.join(w for w in (row, column) if w)}"


_TEXTURE_WORDS = {"solid": "", "striped": "striped ", "checkered": "checkered ", "dotted": "polka-dot ",
                  "speckled": "speckled "}


def make_scene(seed: int, index: int, num_classes: int = len(SHAPE_NAMES), difficulty: str = "standard") -> Scene:
    """The scene of image ``index`` for ``seed``: its class is ``index % num_classes``.

    ``difficulty`` names a :data:`DIFFICULTIES` preset; "standard" scenes are those of every earlier version.
    """
    if not 1 <= num_classes <= len(SHAPE_NAMES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPE_NAMES)}, got {num_classes}")
    variant = _difficulty(difficulty)
    mask = (1 << 64) - 1
    rng = np.random.default_rng([_SCENE_STREAM_TAG, seed & mask, index & mask])
    label = index % num_classes
    radius = float(rng.uniform(*variant.radius))
    if variant.center_jitter is None:
        center = (float(rng.uniform(radius, 1 - radius)), float(rng.uniform(radius, 1 - radius)))
    else:  # the same number of draws, so the later factors of a scene do not depend on the preset
        center = tuple(float(0.5 + variant.center_jitter * rng.uniform(-1, 1)) for _ in range(2))
    main = _make_layer(rng, SHAPE_NAMES[label], radius, center, _pick(rng, variant.textures))

    distractor = None
    if rng.random() < variant.distractor_probability:
        other_kinds = [k for k in SHAPE_NAMES[:num_classes] if k != main.kind] or [main.kind]
        small = radius * float(rng.uniform(0.35, 0.55))
        # Of a few candidate spots, the one farthest from the main shape (fixed number of draws).
        spots = rng.uniform(small, 1 - small, size=(4, 2))
        far = spots[int(np.argmax(np.linalg.norm(spots - np.asarray(center), axis=1)))]
        distractor = _make_layer(rng, _pick(rng, other_kinds), small, (float(far[0]), float(far[1])), "solid")

    background = _pick(rng, variant.backgrounds)
    first = _contrasting(rng, main.colour)
    second = _contrasting(rng, main.colour, exclude=first[0])
    names = (first[0], second[0]) if background == "gradient" else (first[0],)
    colours = (first[1], second[1]) if background == "gradient" else (first[1],)
    background_angle = float(rng.uniform(0, 2 * math.pi))
    background_noise = rng.uniform(-1, 1, (_NOISE_GRID, _NOISE_GRID, 3)).astype(np.float32)

    backdrop = {"plain": f"plain {names[0]}", "gradient": f"{' to '.join(names)} gradient",
                "noisy": f"noisy {names[0]}"}[background]
    caption = (f"a {_size_word(radius)} {main.colour_name} {_TEXTURE_WORDS[main.texture]}{main.kind} "
               f"{_position_words(center)}")
    if distractor is not None:
        caption += f" next to a small {distractor.colour_name} {distractor.kind}"
    caption += f" on a {backdrop} background"
    return Scene(label, main, distractor, background, names, colours, background_angle, background_noise, caption)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _pixel_grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-center coordinates in [0, 1], as (column, row) grids."""
    centers = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    return np.meshgrid(centers, centers)


def _supersampling(resolution: int) -> int:
    return max(1, min(4, math.ceil(512 / resolution)))


def _upsample(grid: np.ndarray, resolution: int) -> np.ndarray:
    """A small float grid in [0, 1] to (resolution, resolution) with bicubic interpolation."""
    image = Image.fromarray(np.clip(grid * 255, 0, 255).astype(np.uint8))
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.BICUBIC), np.float32) / 255


def _coverage(layer: ShapeLayer, resolution: int) -> np.ndarray:
    """Antialiased coverage in [0, 1] of the shape, (R, R, 1): drawn supersampled, box-filtered."""
    size = resolution * _supersampling(resolution)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = layer.center[0] * size, layer.center[1] * size, layer.radius * size

    def disc(x: float, y: float, radius: float, fill: int) -> None:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)

    if layer.kind == "circle":
        disc(cx, cy, r, 255)
    elif layer.kind == "ring":
        disc(cx, cy, r, 255)
        disc(cx, cy, r * 0.55, 0)
    elif layer.kind == "crescent":
        disc(cx, cy, r, 255)
        disc(cx + 0.45 * r * math.cos(layer.rotation), cy + 0.45 * r * math.sin(layer.rotation), r * 0.85, 0)
    else:
        cos, sin = math.cos(layer.rotation), math.sin(layer.rotation)
        outline = _OUTLINES[layer.kind] @ np.array([[cos, sin], [-sin, cos]], dtype=np.float64) * r
        draw.polygon([(cx + x, cy + y) for x, y in outline], fill=255)
    if size != resolution:
        mask = mask.resize((resolution, resolution), Image.Resampling.BOX)
    return (np.asarray(mask, np.float32) / 255)[..., None]


def _texture(layer: ShapeLayer, resolution: int) -> np.ndarray:
    """Texture strength in [0, 1], (R, R, 1); 0 is the plain colour."""
    if layer.texture == "solid":
        return np.zeros((resolution, resolution, 1), np.float32)
    if layer.texture == "speckled":
        noise = _upsample(layer.texture_noise, resolution)
        return np.clip((noise - 0.5) * 3 + 0.5, 0, 1)[..., None]
    u, v = _pixel_grid(resolution)
    cos, sin = math.cos(layer.texture_angle), math.sin(layer.texture_angle)
    a = (u * cos + v * sin) / layer.texture_period
    b = (v * cos - u * sin) / layer.texture_period
    period_px = layer.texture_period * resolution
    # Sharpen a sinusoid only as far as the pixel grid allows: edges stay >= ~1 px wide.
    gain = float(np.clip(period_px / math.pi, 1.0, 4.0))
    if layer.texture == "striped":
        wave = np.sin(2 * math.pi * a)
    elif layer.texture == "checkered":
        wave = 2 * np.sin(2 * math.pi * a) * np.sin(2 * math.pi * b)
    else:  # dotted: discs of radius 0.3 period on the lattice, edge ramp one pixel wide
        distance = np.hypot(a - np.round(a), b - np.round(b))
        return np.clip((0.3 - distance) * period_px + 0.5, 0, 1)[..., None]
    return np.clip(0.5 + 0.5 * gain * wave, 0, 1)[..., None]


def _layer_colours(layer: ShapeLayer, resolution: int) -> np.ndarray:
    """The shape's colour field (R, R, 3): its colour, textured towards white or black."""
    luminance = float(layer.colour @ np.array([0.299, 0.587, 0.114], np.float32)) / 255
    accent = np.zeros(3, np.float32) if luminance > 0.6 else np.full(3, 255, np.float32)
    strength = _texture(layer, resolution) * 0.6
    return layer.colour * (1 - strength) + accent * strength


def _background(scene: Scene, resolution: int) -> np.ndarray:
    base = scene.background_colours[0]
    if scene.background == "plain":
        return np.broadcast_to(base, (resolution, resolution, 3)).astype(np.float32)
    if scene.background == "gradient":
        u, v = _pixel_grid(resolution)
        ramp = 0.5 + (u - 0.5) * math.cos(scene.background_angle) + (v - 0.5) * math.sin(scene.background_angle)
        ramp = np.clip(ramp, 0, 1)[..., None]
        return base * (1 - ramp) + scene.background_colours[1] * ramp
    noise = _upsample(scene.background_noise * 0.5 + 0.5, resolution) * 2 - 1
    return base + 45.0 * noise


def render_scene(scene: Scene, resolution: int) -> Image.Image:
    """Draw a scene as an 8-bit RGB image of side ``resolution``."""
    return render_layers(scene, (scene.distractor, scene.main), resolution)


def render_layers(backdrop, layers, resolution: int) -> Image.Image:
    """Draw ``layers`` (back to front; None entries skipped) over the background of ``backdrop`` (anything
    with a Scene's ``background*`` fields) as an 8-bit RGB image of side ``resolution``."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    canvas = _background(backdrop, resolution)
    for layer in layers:
        if layer is not None:
            alpha = _coverage(layer, resolution)
            canvas = canvas * (1 - alpha) + _layer_colours(layer, resolution) * alpha
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB")


class ShapesDataset(IndexedImageDataset):
    """``builtin:shapes``: ``size`` synthetic images of 10 shape classes, labels balanced (index % 10).

    ``difficulty``: a :data:`DIFFICULTIES` name ("standard" is ``builtin:shapes``, "easy" ``builtin:shapes-easy``).
    """

    def __init__(self, size: int, resolution: int, *, hflip: bool = False, seed: int = 0,
                 difficulty: str = "standard") -> None:
        if size <= 0:
            raise ValueError(f"builtin dataset size must be positive, got {size}")
        _difficulty(difficulty)
        name = "builtin:shapes" if difficulty == "standard" else f"builtin:shapes-{difficulty}"
        super().__init__(name, resolution, hflip=hflip, seed=seed)
        self.difficulty = difficulty
        self.size = size
        self.class_names = list(SHAPE_NAMES)
        self.num_classes = len(SHAPE_NAMES)

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> Scene:
        return make_scene(self.seed, index, self.num_classes, self.difficulty)

    def caption(self, index: int) -> str:
        """The caption of image ``index`` without rendering it."""
        return self.scene(index).caption

    def flip_caption(self, caption: str) -> str:
        return swap_left_right(caption)

    def load(self, index: int) -> tuple[Image.Image, int, str]:
        scene = self.scene(index)
        return render_scene(scene, self.resolution), scene.label, scene.caption


#: Built-in datasets by the NAME of ``builtin:NAME``: a constructor ``(size, resolution, *, hflip, seed)``.
BUILTIN_DATASETS: dict[str, Callable[..., IndexedImageDataset]] = {
    "shapes": ShapesDataset,
    **{f"shapes-{name}": partial(ShapesDataset, difficulty=name) for name in DIFFICULTIES if name != "standard"},
}


def shapes_difficulty(spec: str) -> str | None:
    """The difficulty of a ``builtin:shapes[-NAME]`` data spec, or None for any other spec."""
    if spec == "builtin:shapes":
        return "standard"
    name = spec.removeprefix("builtin:shapes-")
    return name if name != spec and name in DIFFICULTIES else None


def render_shapes(size: int, resolution: int, *, seed: int = 0, difficulty: str = "standard"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` images of ``builtin:shapes`` (of ``difficulty``) with ``seed``, rendered at once:
    uint8 (N, 3, R, R) images and int64 (N,) labels (for evaluation sets held in memory)."""
    dataset = ShapesDataset(size, resolution, seed=seed, difficulty=difficulty)
    scenes = [dataset.scene(i) for i in range(size)]
    return render_scenes(scenes, resolution), torch.tensor([scene.label for scene in scenes], dtype=torch.long)


def render_scenes(scenes: list[Scene], resolution: int) -> torch.Tensor:
    """Scenes drawn at ``resolution`` as one uint8 (N, 3, R, R) tensor."""
    pixels = np.stack([np.asarray(render_scene(scene, resolution)) for scene in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
