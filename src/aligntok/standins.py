"""Offline stand-ins for the two pretrained networks the built-in dataset needs: a DINOv2 and an "Inception".

No machine here can download DINOv2 or Inception weights, yet AlignTok starts from a *pretrained*
foundation encoder and its generation metrics need a pretrained feature network. For ``builtin:shapes``
both are trained here on first use, on a laptop CPU, and cached.

**Stand-in foundation encoder** (:func:`ensure_standin_encoder`): a small ViT with exactly DINOv2's
architecture (transformers' ``Dinov2Model``: hidden 128, 4 blocks, 4 heads, 16 px patches at 64 px, so a
4x4 token grid like the tiny tokenizer's latent). Recipe, and why:

* Supervised multi-attribute classification on ``builtin:shapes`` (random horizontal flips), not DINO
  self-distillation: labels are free here (every image is a known scene) and supervision is the fastest
  signal there is, while self-distillation needs far longer to leave the random-feature regime.
* Targets are every factor of a scene, not only the class: shape class (the label), texture, background
  kind, the main shape's colour and its size. A class-only encoder would throw away colour and texture,
  which a real DINOv2 keeps, and AlignTok's stage 1 freezes the encoder and reconstructs from its tokens;
  the extra targets also speed up learning the class (measured on the CNN below: 38% vs 26% held-out
  accuracy after 600 steps). The heads read DINOv2's own linear-evaluation feature, the CLS token
  concatenated with the mean patch token, so both the CLS token (what FD_DINOv2 reads) and the patch
  tokens (what a tokenizer reads) are trained.
* A dense term keeps the patch tokens local, as DINOv2's iBOT patch objective does: a linear head per
  patch token predicts that patch's colours at 4x4 cells (MSE). Frozen DINOv2 tokens reconstruct images
  well (RAE, Zheng et al. 2025); a stand-in without locality would not.
* AdamW, warm-up then cosine decay, gradient clipping at 1 (``training.trainer.lr_factor``). The images
  are rendered once into memory (rendering costs about as much as a step) and revisited with flips.

Measured limits (recipe version 1, 2 CPU cores; linear probe on average-pooled patch tokens of 2,000 +
1,000 held-out images, chance 10%): a ViT with 16 tokens learns this dataset slowly whatever the recipe
(tried: learning rates 3e-4..4e-3, widths 96..192, depths 4..6, 8 px patches, PCA patch-embedding and
mimetic attention inits, dense per-patch class targets, CNN-feature distillation, a clean-shapes
curriculum, 90-degree rotations, torchvision's ViT; none more than a few points after 800 steps).
The default ``dinov2-shapes`` (500 steps, ~45 s) probes at 12% against 10% for a random initialisation:
barely pretrained. ``dinov2-shapes-long`` (3000 steps, ~4.5 min on idle cores) probes at 21% (its
training head: 29%), clearly semantic but far from a real DINOv2. A CNN learns the same data several
times faster, which is why the evaluation network is one. Each directory's ``standin.json`` records its
held-out accuracy; :func:`probe_standin_encoder` measures the probe against a random initialisation.

It is saved as a real DINOv2 checkpoint (``save_pretrained`` + a ``preprocessor_config.json`` with its
pixel normalisation), so ``aligntok.models.encoders.load_encoder(path)`` and ``Dinov2Model.from_pretrained``
load it like ``facebook/dinov2-small``; the training heads are discarded.

**Evaluation network** (:func:`ensure_eval_network`, :func:`load_eval_network`): plays Inception's role.
Independent of the foundation encoder by construction: a CNN (a stem and four torchvision ResNet
``BasicBlock`` stages, BatchNorm, 128-d global-average-pooled features) rather than a ViT, another
initialisation seed and its own batch order, trained on the same data and targets. Its ``pool``
features give a Fréchet distance (:func:`builtin_fd`), its class logits the class accuracy of
generated samples (:func:`builtin_class_accuracy`); :func:`evaluate_builtin` gives both in one pass.
It is an :class:`aligntok.eval.features.FeatureNetwork`, so ``evaluate_generation(..., inception=net)``
accepts it as well. Held-out class accuracy: ``shapes`` (900 steps, ~45 s) 35%, a weak judge;
``shapes-long`` (3000 steps, ~2.5 min on idle cores) 87%.

**Perceptual distance** (:func:`builtin_perceptual_distance`): plays LPIPS's role, whose VGG/AlexNet
trunks cannot be downloaded either. LPIPS's formula on the evaluation CNN's stage feature maps with
uniform channel weights instead of LPIPS's learned linear heads; its numbers are *not* comparable to
published LPIPS values.

**Cache.** ``$ALIGNTOK_CACHE``, else ``$XDG_CACHE_HOME/aligntok``, else ``~/.cache/aligntok``; one
directory per recipe under ``standins/``, named by a hash of the recipe's settings and
:data:`RECIPE_VERSION`. It is trained in a temporary directory and renamed into place
(:func:`aligntok.io.write_directory_atomically`) while holding a file lock, so concurrent first runs
(two ranks, two processes) train once and every reader sees a complete directory. Training runs in the
calling process only, never as a collective: under torchrun every rank may call ``ensure_*``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aligntok.config import ConfigError, OptimConfig, check_choice, config_to_dict
from aligntok.data.builtin import BACKGROUNDS, SHAPE_NAMES, TEXTURES, Scene, ShapesDataset, render_scenes
from aligntok.eval.features import ImageInput, ModuleFeatures, extract_features, uint8_batches
from aligntok.eval.fid import FeatureStats, frechet_distance
from aligntok.eval.images import from_uint8
from aligntok.io import write_directory_atomically

if TYPE_CHECKING:
    from transformers import Dinov2Model

__all__ = [
    "CACHE_ENV",
    "EVAL_NETWORKS",
    "RECIPE_VERSION",
    "STANDIN_ENCODERS",
    "STANDIN_PREFIX",
    "BuiltinEvalNetwork",
    "EvalNetworkSettings",
    "StandinEncoderSettings",
    "builtin_class_accuracy",
    "builtin_fd",
    "builtin_perceptual_distance",
    "cache_root",
    "ensure_eval_network",
    "ensure_standin_encoder",
    "evaluate_builtin",
    "load_eval_network",
    "probe_standin_encoder",
    "read_standin_info",
    "resolve_encoder_spec",
]

CACHE_ENV = "ALIGNTOK_CACHE"
#: Bump when the training code changes what a given set of settings produces (invalidates caches).
RECIPE_VERSION = 1
#: ``model.encoder=standin:NAME`` names a stand-in encoder (see :func:`resolve_encoder_spec`).
STANDIN_PREFIX = "standin:"
#: Written last into every cached directory: recipe, settings and training record.
INFO_FILE = "standin.json"
EVAL_WEIGHTS_FILE = "model.safetensors"
EVAL_CONFIG_FILE = "config.json"
#: Default seed of the held-out ``builtin:shapes`` images (training uses the dataset's seed 0).
HELDOUT_SEED = 777
_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # a real DINOv2's pixel normalisation, kept for the stand-in
_IMAGENET_STD = (0.229, 0.224, 0.225)
_PIXEL_CELLS = 4  # per patch side: the dense target is each patch's colours at 4x4 cells
_SIZE_MEAN, _SIZE_STD = 0.28, 0.07  # builtin radii are uniform in [0.16, 0.40]: standardise the target


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _RecipeSettings:
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

    def validate(self) -> None:
        if min(self.resolution, self.steps, self.batch_size, self.data_size, self.heldout_size) <= 0:
            raise ConfigError("resolution, steps, batch_size, data_size and heldout_size must be positive")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0 or self.attribute_weight < 0:
            raise ConfigError("lr must be positive; weight_decay, warmup_steps and attribute_weight >= 0")
        check_choice("schedule", self.schedule, ("constant", "cosine", "linear"))


@dataclasses.dataclass
class StandinEncoderSettings(_RecipeSettings):
    """Architecture and recipe of the stand-in DINOv2 (defaults: ~40 s on 2 CPU cores)."""

    hidden_size: int = 128  #: token width (DINOv2-S uses 384)
    num_layers: int = 4  #: transformer blocks
    num_heads: int = 4  #: attention heads (must divide hidden_size)
    patch_size: int = 16  #: pixels per patch side; 64 px / 16 = the tiny tokenizer's 4x4 latent grid
    mlp_ratio: int = 4  #: MLP width / hidden_size
    pixel_weight: float = 1.0  #: weight of the dense per-patch colour term (keeps tokens local)

    def validate(self) -> None:
        super().validate()
        if min(self.hidden_size, self.num_layers, self.num_heads, self.patch_size, self.mlp_ratio) <= 0:
            raise ConfigError("hidden_size, num_layers, num_heads, patch_size and mlp_ratio must be positive")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.resolution % self.patch_size or self.patch_size % _PIXEL_CELLS:
            raise ConfigError(
                f"resolution={self.resolution} must be a multiple of patch_size={self.patch_size}, "
                f"itself a multiple of {_PIXEL_CELLS}"
            )
        if self.pixel_weight < 0:
            raise ConfigError(f"pixel_weight={self.pixel_weight} must be >= 0")


@dataclasses.dataclass
class EvalNetworkSettings(_RecipeSettings):
    """Architecture and recipe of the built-in evaluation CNN (defaults: ~40 s on 2 CPU cores)."""

    widths: tuple[int, ...] = (32, 48, 64, 96, 128)  #: stem width, then one ResNet BasicBlock per stage
    stem_stride: int = 2  #: stride of the stem convolution (2 halves the cost of every stage)
    steps: int = 900  #: optimizer steps
    batch_size: int = 32  #: images per step
    lr: float = 1e-2  #: peak AdamW learning rate
    init_seed: int = 1  #: a different seed from the foundation encoder's

    def validate(self) -> None:
        super().validate()
        if len(self.widths) < 2 or min(self.widths) <= 0 or self.stem_stride not in (1, 2):
            raise ConfigError("widths needs >= 2 positive entries and stem_stride must be 1 or 2")


#: Named stand-in encoders, also for ``model.encoder=standin:NAME``: the default fits the demo's first-run
#: budget; "-long" (~4.5 min on 2 cores) is for runs that can afford a stronger encoder.
STANDIN_ENCODERS: dict[str, StandinEncoderSettings] = {
    "dinov2-shapes": StandinEncoderSettings(),
    "dinov2-shapes-long": StandinEncoderSettings(steps=3000, data_size=12800),
}
#: Named evaluation networks: the default fits the demo's budget; "shapes-long" (~2.5 min) is far more accurate.
EVAL_NETWORKS: dict[str, EvalNetworkSettings] = {
    "shapes": EvalNetworkSettings(),
    "shapes-long": EvalNetworkSettings(steps=3000, data_size=12800),
}


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$ALIGNTOK_CACHE``, else ``$XDG_CACHE_HOME/aligntok``, else ``~/.cache/aligntok``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "aligntok"


def _preset(presets: Mapping[str, Any], what: str, settings: Any, default: str) -> Any:
    """``settings`` itself, or the preset it names (``None``: ``default``)."""
    if settings is None or isinstance(settings, str):
        name = default if settings is None else settings
        if name not in presets:
            raise ValueError(f"unknown {what} {name!r}; available: {', '.join(presets)}")
        return presets[name]
    return settings


def _recipe_key(kind: str, settings: _RecipeSettings) -> str:
    document = {"kind": kind, "recipe_version": RECIPE_VERSION, "settings": config_to_dict(settings)}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def _is_complete(directory: Path) -> bool:
    # The directory appears by an atomic rename with INFO_FILE inside; checking the file as well
    # rejects a directory someone created or emptied by hand.
    return (directory / INFO_FILE).is_file()


#: Trainings run by this process, per kind (lets tests check that a cached recipe is not retrained).
TRAINING_RUNS: dict[str, int] = {"encoder": 0, "eval": 0}
_DESCRIPTIONS = {"encoder": "stand-in DINOv2 foundation encoder", "eval": "built-in evaluation network (CNN)"}


def _ensure_cached(
    kind: str, settings: _RecipeSettings, build: Callable[[Path], dict[str, Any]], *, progress: bool
) -> Path:
    """The cached directory of ``kind`` for ``settings``, built with ``build(tmp_dir)`` if absent."""
    from filelock import FileLock

    settings.validate()
    key = _recipe_key(kind, settings)
    root = cache_root() / "standins"
    target = root / f"{kind}-{key}"
    if _is_complete(target):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the cache directory {root} ({e.strerror}); set ${CACHE_ENV}") from None
    with FileLock(str(root / f".{target.name}.lock")):
        if _is_complete(target):  # another process finished it while this one waited
            return target
        if progress:
            print(f"aligntok: training the {_DESCRIPTIONS[kind]} on builtin:shapes, {settings.steps} steps "
                  f"(first run only; cached in {target})", file=sys.stderr, flush=True)

        def write(staging: Path) -> None:
            record = build(staging)
            info = {"kind": kind, "description": _DESCRIPTIONS[kind], "recipe_version": RECIPE_VERSION,
                    "key": key, "settings": config_to_dict(settings), **record,
                    "device": str(_device()), "torch": torch.__version__}
            (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

        write_directory_atomically(target, write)
        TRAINING_RUNS[kind] += 1
    return target


def read_standin_info(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe, settings and training record (time, losses, held-out accuracy) of a cached directory."""
    file = Path(path) / INFO_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a stand-in directory (no {INFO_FILE})")
    return json.loads(file.read_text())


# ---------------------------------------------------------------------------------------------
# Shared training pieces
# ---------------------------------------------------------------------------------------------

#: Output columns of the attribute heads, in order: name -> width.
_HEAD_LAYOUT: dict[str, int] = {
    "label": len(SHAPE_NAMES), "texture": len(TEXTURES), "background": len(BACKGROUNDS), "colour": 3, "size": 1,
}
_HEAD_WIDTH = sum(_HEAD_LAYOUT.values())


def _split_heads(outputs: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(zip(_HEAD_LAYOUT, outputs.split(list(_HEAD_LAYOUT.values()), dim=1)))


def _scene_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """The flip-invariant factors of each scene: class, texture, background, colour, size."""
    return {
        "label": torch.tensor([s.label for s in scenes]),
        "texture": torch.tensor([TEXTURES.index(s.main.texture) for s in scenes]),
        "background": torch.tensor([BACKGROUNDS.index(s.background) for s in scenes]),
        "colour": torch.from_numpy(np.stack([s.main.colour for s in scenes]) / 127.5 - 1.0).float(),
        "size": torch.tensor([(s.main.radius - _SIZE_MEAN) / _SIZE_STD for s in scenes]).float(),
    }


def _attribute_loss(
    outputs: torch.Tensor, targets: Mapping[str, torch.Tensor], attribute_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    heads = _split_heads(outputs)
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
class _ShapesInMemory:
    """builtin:shapes images rendered once into memory as uint8, with every scene's targets.

    Rendering costs about as much as a training step's compute, so a short recipe renders a fixed set
    once and revisits it (with random flips) instead of drawing fresh images every step.
    """

    images: torch.Tensor  #: (N, 3, R, R) uint8
    targets: dict[str, torch.Tensor]

    @classmethod
    def render(cls, seed: int, size: int, resolution: int) -> _ShapesInMemory:
        dataset = ShapesDataset(size, resolution, seed=seed)
        scenes = [dataset.scene(i) for i in range(size)]
        return cls(render_scenes(scenes, resolution), _scene_targets(scenes))

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


def _train_loop(
    step_loss: Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
    params: list[nn.Parameter],
    settings: _RecipeSettings,
    *,
    progress: bool,
    desc: str,
) -> dict[str, Any]:
    """Train on ``settings.data_size`` in-memory images; returns the final losses and the time taken.

    A plain single-process loop, not the Trainer: the Trainer's collectives expect every rank, while a
    stand-in trains in one process as the others wait on the cache lock (and needs no resume).
    """
    from aligntok.progress import progress_bar
    from aligntok.training.trainer import lr_factor

    start = time.perf_counter()
    data = _ShapesInMemory.render(settings.data_seed, settings.data_size, settings.resolution)
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


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_CONV_LAYOUT = torch.channels_last


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' "Writing model shards" progress bar while a stand-in is saved."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _heldout(settings: _RecipeSettings, seed: int = HELDOUT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``heldout_size`` builtin:shapes images of another seed than training (uint8) and their labels."""
    data = _ShapesInMemory.render(seed, settings.heldout_size, settings.resolution)
    return data.images, data.targets["label"]


# ---------------------------------------------------------------------------------------------
# Stand-in DINOv2
# ---------------------------------------------------------------------------------------------


def _build_dinov2(settings: StandinEncoderSettings) -> Dinov2Model:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        patch_size=settings.patch_size,
        mlp_ratio=settings.mlp_ratio,
        image_size=settings.resolution,  # position embeddings laid out for the training grid
    )
    return Dinov2Model(config)


def _normalise_for_dinov2(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the stand-in's input, as FoundationEncoder does with the preprocessor's mean/std."""
    mean = images.new_tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def _patch_colours(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, patches, 3 * cells^2): each patch's colours at _PIXEL_CELLS^2 cells, raster order."""
    cell = patch_size // _PIXEL_CELLS
    pooled = F.avg_pool2d(images, cell)  # (B, 3, H/cell, W/cell)
    b, c, h, w = pooled.shape
    grid_h, grid_w = h // _PIXEL_CELLS, w // _PIXEL_CELLS
    cells = pooled.reshape(b, c, grid_h, _PIXEL_CELLS, grid_w, _PIXEL_CELLS)
    return cells.permute(0, 2, 4, 1, 3, 5).reshape(b, grid_h * grid_w, c * _PIXEL_CELLS**2)


def _train_standin_encoder(settings: StandinEncoderSettings, staging: Path, progress: bool) -> dict[str, Any]:
    from transformers import BitImageProcessor

    device = _device()
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(settings.init_seed)
        model = _build_dinov2(settings).to(device)
        # DINOv2's linear-evaluation feature (CLS ++ mean patch token) feeds the attribute heads.
        heads = nn.Linear(2 * settings.hidden_size, _HEAD_WIDTH).to(device)
        pixel_head = nn.Linear(settings.hidden_size, 3 * _PIXEL_CELLS**2).to(device)

        def forward(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            tokens = model(pixel_values=_normalise_for_dinov2(images)).last_hidden_state
            cls, patches = tokens[:, 0], tokens[:, 1:]
            return heads(torch.cat([cls, patches.mean(dim=1)], dim=1)), patches

        def step_loss(images: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            images, targets = images.to(device), {k: v.to(device) for k, v in targets.items()}
            outputs, patches = forward(images)
            loss, logs = _attribute_loss(outputs, targets, settings.attribute_weight)
            pixel_mse = F.mse_loss(pixel_head(patches), _patch_colours(images, settings.patch_size))
            logs["pixel_mse"] = pixel_mse.item()
            return loss + settings.pixel_weight * pixel_mse, logs

        params = [*model.parameters(), *heads.parameters(), *pixel_head.parameters()]
        model.train()
        record = _train_loop(step_loss, params, settings, progress=progress, desc="stand-in DINOv2")
        model.eval()
        images, labels = _heldout(settings)
        with torch.no_grad():
            logits = torch.cat([
                _split_heads(forward(from_uint8(x).to(device))[0])["label"].cpu() for x in images.split(250)
            ])
        record["heldout_class_accuracy"] = (logits.argmax(1) == labels).float().mean().item()
        record["heldout"] = {"seed": HELDOUT_SEED, "num_images": len(labels), "head": "CLS ++ mean patch, linear"}

    with _quiet_transformers():
        model.cpu().save_pretrained(staging)
    BitImageProcessor(
        size={"shortest_edge": settings.resolution},
        crop_size={"height": settings.resolution, "width": settings.resolution},
        image_mean=list(_IMAGENET_MEAN),
        image_std=list(_IMAGENET_STD),
    ).save_pretrained(staging)
    (staging / "README.md").write_text(
        "# Stand-in DINOv2 (not Meta's weights)\n\n"
        "A small ViT with DINOv2's architecture, trained by aligntok on its built-in synthetic dataset "
        "(`builtin:shapes`) because real DINOv2 weights cannot be downloaded offline. It knows nothing "
        "but that dataset. Recipe: `aligntok.standins` module docstring; settings and training record: "
        f"`{INFO_FILE}`.\n"
    )
    return record


def ensure_standin_encoder(
    settings: StandinEncoderSettings | str | None = None, *, progress: bool = True
) -> Path:
    """Directory of the stand-in DINOv2 for ``settings``: a recipe or a :data:`STANDIN_ENCODERS` name
    (default ``dinov2-shapes``, ~45 s on 2 CPU cores on first use, then cached).

    Load it with ``aligntok.models.encoders.load_encoder(path)``, or pass ``model.encoder=<path>``.
    """
    settings = _preset(STANDIN_ENCODERS, "stand-in encoder", settings, "dinov2-shapes")
    return _ensure_cached(
        "encoder", settings, lambda staging: _train_standin_encoder(settings, staging, progress), progress=progress
    )


def resolve_encoder_spec(spec: str, *, progress: bool = True) -> str:
    """``standin:NAME`` -> the cached stand-in's directory (trained if needed); any other spec unchanged."""
    if not spec.startswith(STANDIN_PREFIX):
        return spec
    name = spec[len(STANDIN_PREFIX):]
    if name not in STANDIN_ENCODERS:  # named with the prefix, as the user wrote it
        raise ValueError(f"unknown stand-in encoder {spec!r}; available: "
                         f"{', '.join(STANDIN_PREFIX + n for n in STANDIN_ENCODERS)}")
    return str(ensure_standin_encoder(name, progress=progress))


@torch.no_grad()
def probe_standin_encoder(
    path: str | os.PathLike,
    *,
    num_train: int = 2000,
    num_test: int = 1000,
    seed: int = HELDOUT_SEED,
    stride: int | None = None,
    compare_random: bool = True,
) -> dict[str, Any]:
    """Linear-probe accuracy of the encoder's average-pooled patch tokens on held-out builtin images.

    Images of seed ``seed`` (not the training images of seed 0) at the encoder's training resolution:
    the first ``num_train`` fit :func:`aligntok.eval.probe.linear_probe`, the next ``num_test`` score it.
    ``stride`` (default: the patch size, i.e. native resolution) is passed to ``load_encoder``. With
    ``compare_random`` the same architecture with random weights is probed too: the baseline to beat.
    """
    from aligntok.eval.probe import linear_probe
    from aligntok.models.encoders import FoundationEncoder, build_encoder_from_config, load_encoder

    hf_config = json.loads((Path(path) / "config.json").read_text())
    encoder = load_encoder(str(path), stride=stride or hf_config["patch_size"]).eval()
    resolution = hf_config["image_size"]
    data = _ShapesInMemory.render(seed, num_train + num_test, resolution)
    labels = data.targets["label"]

    def score(net: FoundationEncoder) -> dict[str, Any]:
        pooled = torch.cat([net(from_uint8(x)).mean(dim=(2, 3)) for x in data.images.split(250)])
        return linear_probe(pooled[:num_train], labels[:num_train], pooled[num_train:], labels[num_train:])

    result: dict[str, Any] = {"standin": score(encoder), "resolution": resolution, "seed": seed}
    if compare_random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random = build_encoder_from_config("dinov2", encoder.hf_config.to_dict(), stride=encoder.stride)
        random.pixel_mean.copy_(encoder.pixel_mean)
        random.pixel_std.copy_(encoder.pixel_std)
        result["random_init"] = score(random.eval())
    return result


# ---------------------------------------------------------------------------------------------
# Evaluation network
# ---------------------------------------------------------------------------------------------


def _build_eval_backbone(widths: tuple[int, ...] | list[int], stem_stride: int) -> nn.Sequential:
    """Stem conv, then one stride-2 torchvision BasicBlock per further width, global average pool."""
    from torchvision.models.resnet import BasicBlock

    layers: list[nn.Module] = [
        nn.Conv2d(3, widths[0], 3, stride=stem_stride, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    ]
    for before, after in itertools.pairwise(widths):
        shortcut = nn.Sequential(nn.Conv2d(before, after, 1, stride=2, bias=False), nn.BatchNorm2d(after))
        layers.append(BasicBlock(before, after, stride=2, downsample=shortcut))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


class BuiltinEvalNetwork(ModuleFeatures):
    """The built-in evaluation CNN as a feature network: ``pool`` (B, D) and class ``logits`` (B, 10).

    Takes uint8 images like every :class:`~aligntok.eval.features.FeatureNetwork` (any size: resized
    to its training resolution), so ``extract_features`` and ``evaluate_generation(inception=...)`` accept it.
    """

    outputs = ("pool", "logits")

    def __init__(self, backbone: nn.Module, heads: nn.Linear, *, resolution: int, weights_path: Path) -> None:
        super().__init__(backbone, name="builtin-shapes-eval-cnn", input_size=resolution, weights_path=weights_path)
        self.heads = heads.eval().requires_grad_(False)
        self.class_names = list(SHAPE_NAMES)

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool = super().features(images)["pool"]
        return {"pool": pool, "logits": _split_heads(self.heads(pool))["label"]}

    def stage_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps (B, C_s, H_s, W_s) of every backbone stage, before pooling, for uint8 (B, 3, H, W) images.

        The stages are the stem's ReLU output and each BasicBlock's output, in order. Images are
        prepared exactly as for :meth:`features` (the same forward pass runs; hooks catch the maps).
        """
        from torchvision.models.resnet import BasicBlock

        stages = [child for child in self.module.children() if isinstance(child, (nn.ReLU, BasicBlock))]
        captured: list[torch.Tensor] = []
        hooks = [stage.register_forward_hook(lambda _m, _i, output: captured.append(output)) for stage in stages]
        try:
            self(images)  # forward(): checks the input, then features(): preprocessing, backbone, heads
        finally:
            for hook in hooks:
                hook.remove()
        return captured

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["preprocessing"] = f"uint8 -> {self.input_size}x{self.input_size} bilinear (antialiased) -> [-1, 1]"
        info["trained_on"] = "builtin:shapes (aligntok.standins)"
        return info


def _train_eval_network(settings: EvalNetworkSettings, staging: Path, progress: bool) -> dict[str, Any]:
    from safetensors.torch import save_file

    device = _device()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.init_seed)
        # channels_last: oneDNN's faster convolution layout on CPU (~1.5x here); no effect on the result.
        backbone = _build_eval_backbone(settings.widths, settings.stem_stride).to(device, memory_format=_CONV_LAYOUT)
        heads = nn.Linear(settings.widths[-1], _HEAD_WIDTH).to(device)

        def step_loss(images: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            targets = {k: v.to(device) for k, v in targets.items()}
            features = backbone(images.to(device).contiguous(memory_format=_CONV_LAYOUT))
            return _attribute_loss(heads(features), targets, settings.attribute_weight)

        backbone.train()
        record = _train_loop(step_loss, [*backbone.parameters(), *heads.parameters()], settings,
                             progress=progress, desc="evaluation CNN")

    weights = staging / EVAL_WEIGHTS_FILE
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"heads.{k}": v for k, v in heads.state_dict().items()})
    save_file({k: v.detach().cpu().contiguous(memory_format=torch.contiguous_format) for k, v in state.items()},
              str(weights))
    config = {"architecture": "aligntok.standins eval CNN", "widths": list(settings.widths),
              "stem_stride": settings.stem_stride, "resolution": settings.resolution,
              "head_layout": _HEAD_LAYOUT, "class_names": list(SHAPE_NAMES)}
    (staging / EVAL_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    network = load_eval_network(staging).to(device)
    images, labels = _heldout(settings)
    record["heldout_class_accuracy"] = builtin_class_accuracy(images, labels, network=network)
    record["heldout"] = {"seed": HELDOUT_SEED, "num_images": len(labels)}
    return record


def ensure_eval_network(settings: EvalNetworkSettings | str | None = None, *, progress: bool = True) -> Path:
    """Directory of the built-in evaluation network for ``settings``: a recipe or an :data:`EVAL_NETWORKS`
    name (default ``shapes``, ~40 s on 2 CPU cores on first use, then cached)."""
    settings = _preset(EVAL_NETWORKS, "evaluation network", settings, "shapes")
    return _ensure_cached(
        "eval", settings, lambda staging: _train_eval_network(settings, staging, progress), progress=progress
    )


def load_eval_network(path: str | os.PathLike | None = None, *, device: str | torch.device | None = None
                      ) -> BuiltinEvalNetwork:
    """The evaluation network saved in ``path`` (default: the cached default recipe, trained if needed)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else ensure_eval_network()
    config_file, weights = path / EVAL_CONFIG_FILE, path / EVAL_WEIGHTS_FILE
    if not config_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{path} is not an evaluation-network directory ({EVAL_CONFIG_FILE} + "
                                f"{EVAL_WEIGHTS_FILE}); build one with aligntok.standins.ensure_eval_network()")
    config = json.loads(config_file.read_text())
    if config.get("head_layout") != _HEAD_LAYOUT:
        raise ValueError(f"{path}: evaluation network heads {config.get('head_layout')} differ from {_HEAD_LAYOUT}")
    backbone = _build_eval_backbone(config["widths"], config["stem_stride"])
    heads = nn.Linear(config["widths"][-1], _HEAD_WIDTH)
    state = load_file(str(weights))
    try:
        backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
        heads.load_state_dict({k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")})
    except RuntimeError as e:
        raise ValueError(f"{weights}: weights do not fit the configured network ({str(e).splitlines()[0]})") from None
    network = BuiltinEvalNetwork(backbone, heads, resolution=config["resolution"], weights_path=weights)
    return network.to(device) if device is not None else network


def _network(network: BuiltinEvalNetwork | None, device: str | torch.device | None) -> BuiltinEvalNetwork:
    network = network if network is not None else load_eval_network()
    return network.to(device) if device is not None else network


def _accuracy(logits: torch.Tensor, labels: Any) -> float:
    labels = torch.as_tensor(np.asarray(labels)).long().flatten()
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {logits.shape[0]} images")
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must be class indices in [0, {logits.shape[1]}), got {labels.min()}..{labels.max()}")
    return (logits.argmax(dim=1) == labels).float().mean().item()


def _frechet(sample_pool: torch.Tensor, ref_pool: torch.Tensor) -> float:
    stats = []
    for pool in (sample_pool, ref_pool):
        accumulator = FeatureStats()
        accumulator.update(pool)
        stats.append(accumulator)
    return frechet_distance(stats[0].mean, stats[0].cov, stats[1].mean, stats[1].cov)


def builtin_fd(
    samples: ImageInput, refs: ImageInput, *, network: BuiltinEvalNetwork | None = None,
    batch_size: int = 250, device: str | torch.device | None = None,
) -> float:
    """Fréchet distance between two image sets in the evaluation network's ``pool`` features.

    Images: uint8 (N, H, W, 3) arrays, (N, 3, H, W) tensors (uint8 or float in [-1, 1]) or an ImageSource.
    """
    network = _network(network, device)
    pools = [extract_features(network, x, batch_size=batch_size)["pool"] for x in (samples, refs)]
    return _frechet(*pools)


def builtin_class_accuracy(
    samples: ImageInput, labels: Any, *, network: BuiltinEvalNetwork | None = None,
    batch_size: int = 250, device: str | torch.device | None = None,
) -> float:
    """Fraction of ``samples`` the evaluation network classifies as their ``labels`` (the class asked for)."""
    network = _network(network, device)
    return _accuracy(extract_features(network, samples, batch_size=batch_size)["logits"], labels)


def evaluate_builtin(
    samples: ImageInput, labels: Any, refs: ImageInput, *, network: BuiltinEvalNetwork | None = None,
    batch_size: int = 250, device: str | torch.device | None = None,
) -> dict[str, Any]:
    """FD (vs ``refs``) and class accuracy (vs ``labels``) of generated ``samples`` in one feature pass."""
    network = _network(network, device)
    sample_features = extract_features(network, samples, batch_size=batch_size)
    ref_pool = extract_features(network, refs, batch_size=batch_size)["pool"]
    return {
        "fd": _frechet(sample_features["pool"], ref_pool),
        "class_accuracy": _accuracy(sample_features["logits"], labels),
        "num_samples": int(sample_features["pool"].shape[0]),
        "num_references": int(ref_pool.shape[0]),
        "network": network.describe(),
    }


#: LPIPS's ``normalize_tensor`` epsilon, added to each feature vector's norm (keeps all-zero vectors finite).
LPIPS_EPS = 1e-10


def _unit_normalise(features: torch.Tensor) -> torch.Tensor:
    """Each spatial position's feature vector divided by its channel norm (+ eps), as lpips does."""
    import lpips

    return lpips.normalize_tensor(features, eps=LPIPS_EPS)


@torch.inference_mode()
def builtin_perceptual_distance(
    originals: ImageInput, reconstructions: ImageInput, *, network: BuiltinEvalNetwork | None = None,
    batch_size: int = 250, device: str | torch.device | None = None,
) -> torch.Tensor:
    """Per-image perceptual distance (float32 CPU tensor, shape (N,)) between paired image sets.

    LPIPS's distance (Zhang et al., 2018) with *uniform weights*, computed on the built-in evaluation
    CNN: for each stage feature map of :meth:`BuiltinEvalNetwork.stage_features` (the stem's ReLU
    output and every BasicBlock's output, before pooling), unit-normalise each spatial position's
    feature vector over channels (LPIPS's eps), take the squared difference, average it over channels
    (LPIPS learns per-channel weights here; this uses 1/C) and spatial positions, and sum over stages.
    It is the offline stand-in for LPIPS on ``builtin:shapes``, where VGG/AlexNet weights cannot be
    downloaded. Its values are NOT comparable to published LPIPS numbers (another network, no learned
    weights); compare them only with each other, under the same evaluation network.

    Images: uint8 (N, H, W, 3) arrays, (N, 3, H, W) tensors (uint8 or float in [-1, 1], quantised to
    uint8 first, as the network takes) or ImageSources; ``originals[i]`` pairs with ``reconstructions[i]``
    and both must have the same count and image size. Identical pairs give exactly 0.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    network = _network(network, device)
    original_batches, num_originals = uint8_batches(originals, batch_size)
    reconstruction_batches, num_reconstructions = uint8_batches(reconstructions, batch_size)
    if num_originals != num_reconstructions:
        raise ValueError(f"{num_originals} originals but {num_reconstructions} reconstructions; "
                         f"the perceptual distance compares pairs")
    distances: list[torch.Tensor] = []
    for first, second in zip(original_batches, reconstruction_batches, strict=True):
        if first.shape != second.shape:
            raise ValueError(f"originals are {tuple(first.shape[1:])} and reconstructions {tuple(second.shape[1:])} "
                             f"per image (C, H, W); pairs must have the same size")
        # Two separate passes of equal shape: identical inputs give bitwise identical maps, hence exactly 0.
        first_maps = network.stage_features(first.to(network.device))
        second_maps = network.stage_features(second.to(network.device))
        total = torch.zeros(first.shape[0], device=network.device)
        for a, b in zip(first_maps, second_maps, strict=True):
            total += (_unit_normalise(a) - _unit_normalise(b)).square().mean(dim=(1, 2, 3))
        distances.append(total.float().cpu())
    return torch.cat(distances) if distances else torch.zeros(0)
