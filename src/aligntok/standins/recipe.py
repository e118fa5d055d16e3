"""What both stand-in recipes share: settings, data held in memory, the attribute targets, the loop.

Both networks learn every factor of a ``builtin:shapes`` scene, not only the class: shape class (the
label), texture, background kind, the main shape's colour and its size. A class-only network would
throw away colour and texture, which a real DINOv2 keeps; the extra targets also speed up learning the
class (measured on the evaluation CNN: 38% vs 26% held-out accuracy after 600 steps). The loop is AdamW,
warm-up then cosine decay, gradient clipping at 1 (``training.optim.lr_factor``); the images are
rendered once into memory (rendering costs about as much as a step) and revisited with flips.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aligntok.config import ConfigError, OptimConfig, check_choice
from aligntok.data.builtin import (
    BACKGROUNDS,
    DIFFICULTIES,
    SHAPE_NAMES,
    TEXTURES,
    Scene,
    ShapesDataset,
    render_scenes,
)
from aligntok.data.scenes import (
    SCENE_COLOURS,
    SCENE_KINDS,
    make_scene_graph,
    render_scene_graphs,
)
from aligntok.eval.images import from_uint8

#: Default seed of the held-out ``builtin:shapes`` images (training uses the dataset's seed 0).
HELDOUT_SEED = 777
_SIZE_MEAN, _SIZE_STD = 0.28, 0.07  # builtin radii are uniform in [0.16, 0.40]: standardise the target


@dataclasses.dataclass
class RecipeSettings:
    """Data and optimisation shared by both recipes."""

    resolution: int = 64  #: image side in pixels (builtin:shapes renders at any size)
    steps: int = 500  #: optimizer steps
    batch_size: int = 64  #: images per step
    lr: float = 2e-3  #: peak AdamW learning rate
    weight_decay: float = 0.05  #: AdamW decoupled weight decay
    warmup_steps: int = 30  #: linear warm-up steps
    schedule: str = "cosine"  #: after warm-up: constant | cosine | linear (decay to 0 at ``steps``)
    data_seed: int = 0  #: builtin:shapes seed (0 = the images tokenizers train on); held-out images use another
    data_size: int = 6400  #: distinct training images, rendered once into memory (steps revisit them)
    init_seed: int = 0  #: seed of the weight initialisation and of the batch order
    hflip: bool = True  #: random horizontal flips (every target is flip-invariant)
    attribute_weight: float = 0.5  #: weight of the texture, background, colour and size terms (class: 1)
    heldout_size: int = 500  #: held-out images (seed HELDOUT_SEED) whose class accuracy is recorded
    difficulty: str = "standard"  #: builtin:shapes difficulty preset of the training and held-out images

    def validate(self) -> None:
        if min(self.resolution, self.steps, self.batch_size, self.data_size, self.heldout_size) <= 0:
            raise ConfigError("resolution, steps, batch_size, data_size and heldout_size must be positive")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0 or self.attribute_weight < 0:
            raise ConfigError("lr must be positive; weight_decay, warmup_steps and attribute_weight >= 0")
        check_choice("schedule", self.schedule, ("constant", "cosine", "linear"))
        check_choice("difficulty", self.difficulty, tuple(DIFFICULTIES))



#: Output columns of the attribute heads, in order: name -> width.
HEAD_LAYOUT: dict[str, int] = {
    "label": len(SHAPE_NAMES), "texture": len(TEXTURES), "background": len(BACKGROUNDS), "colour": 3, "size": 1,
}
HEAD_WIDTH = sum(HEAD_LAYOUT.values())


def split_heads(outputs: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(zip(HEAD_LAYOUT, outputs.split(list(HEAD_LAYOUT.values()), dim=1)))


def scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """The flip-invariant factors of each scene: class, texture, background, colour, size."""
    return {
        "label": torch.tensor([s.label for s in scenes]),
        "texture": torch.tensor([TEXTURES.index(s.main.texture) for s in scenes]),
        "background": torch.tensor([BACKGROUNDS.index(s.background) for s in scenes]),
        "colour": torch.from_numpy(np.stack([s.main.colour for s in scenes]) / 127.5 - 1.0).float(),
        "size": torch.tensor([(s.main.radius - _SIZE_MEAN) / _SIZE_STD for s in scenes]).float(),
    }


def attribute_loss(
    outputs: torch.Tensor, targets: Mapping[str, torch.Tensor], attribute_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    heads = split_heads(outputs)
    parts = {
        "class_ce": F.cross_entropy(heads["label"], targets["label"]),
        "texture_ce": F.cross_entropy(heads["texture"], targets["texture"]),
        "background_ce": F.cross_entropy(heads["background"], targets["background"]),
        "colour_mse": F.mse_loss(heads["colour"], targets["colour"]),
        "size_mse": F.mse_loss(heads["size"][:, 0], targets["size"]),
    }
    loss = parts["class_ce"] + attribute_weight * sum(v for k, v in parts.items() if k != "class_ce")
    logs = {k: v.item() for k, v in parts.items()}
    logs["class_acc"] = (heads["label"].argmax(1) == targets["label"]).float().mean().item()
    return loss, logs


@dataclasses.dataclass
class ShapesInMemory:
    """builtin:shapes images rendered once into memory as uint8, with every scene's targets.

    Rendering costs about as much as a training step's compute, so a short recipe renders a fixed set
    once and revisits it (with random flips) instead of drawing fresh images every step.
    """

    images: torch.Tensor  #: (N, 3, R, R) uint8
    targets: dict[str, torch.Tensor]

    @classmethod
    def render(cls, seed: int, size: int, resolution: int, difficulty: str = "standard") -> ShapesInMemory:
        dataset = ShapesDataset(size, resolution, seed=seed, difficulty=difficulty)
        scenes = [dataset.scene(i) for i in range(size)]
        return cls(render_scenes(scenes, resolution), scene_targets(scenes))

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, size: int, generator: torch.Generator, *, hflip: bool
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``size`` random images (float in [-1, 1], flipped at random when ``hflip``) and their targets."""
        images, targets, _ = _random_batch(self.images, self.targets, size, generator, hflip)
        return images, targets


def _random_batch(images: torch.Tensor, targets: Mapping[str, torch.Tensor], size: int, generator: torch.Generator,
                  hflip: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """``size`` random rows of uint8 ``images`` as floats in [-1, 1] and their targets, each image flipped
    with probability 1/2 when ``hflip``; also the flip mask (None without flips)."""
    index = torch.randint(len(images), (size,), generator=generator)
    drawn, flip = from_uint8(images[index]), None
    if hflip:
        flip = torch.rand(size, generator=generator) < 0.5
        drawn = torch.where(flip[:, None, None, None], drawn.flip(-1), drawn)
    return drawn, {key: value[index] for key, value in targets.items()}, flip


def train_loop(
    step_loss: Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
    params: list[nn.Parameter],
    settings: RecipeSettings,
    *,
    progress: bool,
    desc: str,
    scenes: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """Train on ``settings.data_size`` in-memory images; returns the final losses and the time taken.

    ``scenes``: (images per batch, distinct images, patch size) of builtin:scenes to mix into each batch
    (:class:`ScenesInMemory`, seed ``settings.data_seed``): ``step_loss`` then gets the shapes first and the
    scenes' targets under ``scene/NAME``. A plain single-process loop, not the Trainer: the Trainer's
    collectives expect every rank, while a stand-in trains in one process as the others wait on the cache
    lock (and needs no resume).
    """
    from aligntok.progress import progress_bar
    from aligntok.training.optim import lr_factor

    start = time.perf_counter()
    data = ShapesInMemory.render(settings.data_seed, settings.data_size, settings.resolution, settings.difficulty)
    per_batch, scene_data = 0, None
    if scenes is not None:
        per_batch, size, patch_size = scenes
        scene_data = ScenesInMemory.render(settings.data_seed, size, settings.resolution, patch_size)
    render_seconds = time.perf_counter() - start
    schedule = OptimConfig(lr=settings.lr, weight_decay=settings.weight_decay, warmup_steps=settings.warmup_steps,
                           schedule=settings.schedule, grad_clip=1.0)
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, schedule, settings.steps))
    generator = torch.Generator().manual_seed(settings.init_seed)
    recent: list[dict[str, float]] = []
    with progress_bar(range(settings.steps), desc=desc, disable=not progress, leave=False) as bar:
        for step in bar:
            images, targets = data.batch(settings.batch_size - per_batch, generator, hflip=settings.hflip)
            if scene_data is not None:
                scene_images, extra = scene_data.batch(per_batch, generator, hflip=settings.hflip)
                images = torch.cat([images, scene_images])
                targets.update({f"scene/{key}": value for key, value in extra.items()})
            loss, logs = step_loss(images, targets)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{desc}: non-finite loss at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, schedule.grad_clip)
            optimizer.step()
            scheduler.step()
            recent = (recent + [{"loss": loss.item(), **logs}])[-10:]
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{logs['class_acc']:.2f}")
    return {
        "render_seconds": round(render_seconds, 2),
        "train_seconds": round(time.perf_counter() - start - render_seconds, 2),
        "final_train_logs_last10": {key: float(np.mean([r[key] for r in recent])) for key in recent[0]},
    }



def heldout(settings: RecipeSettings, seed: int = HELDOUT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``heldout_size`` builtin:shapes images of another seed than training (uint8) and their labels."""
    data = ShapesInMemory.render(seed, settings.heldout_size, settings.resolution, settings.difficulty)
    return data.images, data.targets["label"]


@dataclasses.dataclass
class ScenesInMemory:
    """builtin:scenes images rendered once into memory (uint8) with targets a scene's caption depends on.

    Global: how many objects of each kind (0-4, a class per kind) and which colours are present (multi-hot);
    per patch of ``patch_size`` px: the kind of the object it shows (0 = none): the patch holding the object's
    centre, and every patch that a quarter of its side or more of the object's box covers along both axes.
    """

    images: torch.Tensor  #: (N, 3, R, R) uint8
    targets: dict[str, torch.Tensor]

    @classmethod
    def render(cls, seed: int, size: int, resolution: int, patch_size: int) -> ScenesInMemory:
        graphs = [make_scene_graph(seed, i) for i in range(size)]
        images = render_scene_graphs(graphs, resolution)
        grid = resolution // patch_size
        starts = np.arange(grid) / grid

        def covered(low: float, high: float, centre: float) -> torch.Tensor:
            overlap = np.clip(np.minimum(starts + 1 / grid, high) - np.maximum(starts, low), 0, None)
            inside = overlap >= 0.25 / grid
            inside[min(int(centre * grid), grid - 1)] = True
            return torch.from_numpy(inside)

        counts = torch.zeros(size, len(SCENE_KINDS), dtype=torch.long)
        colours = torch.zeros(size, len(SCENE_COLOURS))
        token_kind = torch.zeros(size, grid, grid, dtype=torch.long)
        for n, graph in enumerate(graphs):
            for obj in graph.objects:
                kind = SCENE_KINDS.index(obj.kind)
                counts[n, kind] += 1
                colours[n, list(SCENE_COLOURS).index(obj.colour)] = 1.0
                x0, y0, x1, y1 = obj.box
                inside_x, inside_y = covered(x0, x1, obj.center[0]), covered(y0, y1, obj.center[1])
                token_kind[n][inside_y[:, None] & inside_x[None, :]] = kind + 1
        return cls(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                   {"kind_counts": counts, "colours": colours, "token_kind": token_kind})

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, size: int, generator: torch.Generator, *, hflip: bool
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As :meth:`ShapesInMemory.batch`; a flip mirrors the per-patch targets with the image."""
        images, targets, flip = _random_batch(self.images, self.targets, size, generator, hflip)
        if flip is not None:
            targets["token_kind"] = torch.where(flip[:, None, None], targets["token_kind"].flip(-1),
                                                targets["token_kind"])
        targets["token_kind"] = targets["token_kind"].flatten(1)  # raster order, as the patch tokens
        return images, targets


#: Output columns of the scene heads: per kind a 5-way count (0-4), then the ten colours' presence.
SCENE_COUNT_CLASSES = 5


def scene_loss(global_outputs: torch.Tensor, token_logits: torch.Tensor, targets: Mapping[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Counts per kind (cross-entropy), colour presence (binary cross-entropy), per-patch kind (cross-entropy)."""
    kinds = targets["kind_counts"].shape[1]
    count_logits = global_outputs[:, : kinds * SCENE_COUNT_CLASSES].reshape(-1, kinds, SCENE_COUNT_CLASSES)
    colour_logits = global_outputs[:, kinds * SCENE_COUNT_CLASSES:]
    parts = {
        "count_ce": F.cross_entropy(count_logits.flatten(0, 1), targets["kind_counts"].flatten()),
        "colour_bce": F.binary_cross_entropy_with_logits(colour_logits, targets["colours"]),
        "token_kind_ce": F.cross_entropy(token_logits.flatten(0, 1), targets["token_kind"].flatten()),
    }
    logs = {k: v.item() for k, v in parts.items()}
    logs["token_kind_acc"] = (token_logits.argmax(-1) == targets["token_kind"]).float().mean().item()
    return sum(parts.values()), logs
