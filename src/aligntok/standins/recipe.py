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
        index = torch.randint(len(self), (size,), generator=generator)
        images = from_uint8(self.images[index])
        if hflip:
            flip = torch.rand(size, generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images, {key: value[index] for key, value in self.targets.items()}


def train_loop(
    step_loss: Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
    params: list[nn.Parameter],
    settings: RecipeSettings,
    *,
    progress: bool,
    desc: str,
) -> dict[str, Any]:
    """Train on ``settings.data_size`` in-memory images; returns the final losses and the time taken.

    A plain single-process loop, not the Trainer: the Trainer's collectives expect every rank, while a
    stand-in trains in one process as the others wait on the cache lock (and needs no resume).
    """
    from aligntok.progress import progress_bar
    from aligntok.training.optim import lr_factor

    start = time.perf_counter()
    data = ShapesInMemory.render(settings.data_seed, settings.data_size, settings.resolution, settings.difficulty)
    render_seconds = time.perf_counter() - start
    schedule = OptimConfig(lr=settings.lr, weight_decay=settings.weight_decay, warmup_steps=settings.warmup_steps,
                           schedule=settings.schedule, grad_clip=1.0)
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, schedule, settings.steps))
    generator = torch.Generator().manual_seed(settings.init_seed)
    recent: list[dict[str, float]] = []
    with progress_bar(range(settings.steps), desc=desc, disable=not progress, leave=False) as bar:
        for step in bar:
            images, targets = data.batch(settings.batch_size, generator, hflip=settings.hflip)
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

