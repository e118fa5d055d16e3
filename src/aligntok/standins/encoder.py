"""The stand-in foundation encoder: a small ViT with exactly DINOv2's architecture, trained on builtin:shapes.

No machine here can download DINOv2, yet AlignTok starts from a *pretrained* foundation encoder. This
one is transformers' ``Dinov2Model`` (hidden 128, 4 blocks, 4 heads by default), saved as a real DINOv2
checkpoint (``save_pretrained`` + a ``preprocessor_config.json`` with its pixel normalisation), so
``aligntok.models.encoders.load_encoder(path)`` and ``Dinov2Model.from_pretrained`` load it like
``facebook/dinov2-small``; the training heads are discarded. Recipe, and why:

* Supervised multi-attribute classification on ``builtin:shapes`` (random horizontal flips; targets in
  :mod:`.recipe`), not DINO self-distillation: labels are free here and supervision is the fastest
  signal there is, while self-distillation needs far longer to leave the random-feature regime. The
  heads read DINOv2's own linear-evaluation feature, the CLS token concatenated with the mean patch
  token, so both the CLS token (what FD_DINOv2 reads) and the patch tokens (what a tokenizer reads)
  are trained.
* A dense term keeps the patch tokens local, as DINOv2's iBOT patch objective does: a linear head per
  patch token predicts that patch's colours at 4x4 cells (MSE). Frozen DINOv2 tokens reconstruct images
  well (RAE, Zheng et al. 2025); a stand-in without locality would not.

Measured (recipe version 1, 2 CPU cores; linear probe on average-pooled patch tokens of 1,000 + 500
held-out images, chance 10%): how fast the ViT learns depends on the data more than on the recipe. On
``standard`` data (textures, noisy backgrounds, distractors) a ViT learns slowly whatever the recipe
(tried: learning rates 3e-4..4e-3, widths 96..192, depths 4..6, 8 px patches, PCA patch-embedding and
mimetic attention inits, dense per-patch class targets, CNN-feature distillation, 90-degree rotations,
torchvision's ViT; none more than a few points after 800 steps; 3000 steps probe at 21%). The shipped
``dinov2-shapes-p8`` (standard data, 600 steps) keeps the 8x8 token grid local (its dense colour term)
but is hardly semantic: its own head classifies 13.8% of held-out images. On the demo's
``centered`` data the same architecture learns steadily: its head at 500 / 1500 / 2500 / 4000 steps
(batch 64, 12,800 images) classifies 39 / 63 / 72 / 84% of held-out images, the probe reads 42 / 58 / 68 /
73%; the shipped ``dinov2-centered-p8`` is that 4000-step run, the class-to-image reproduction's encoder
(the demo keeps ``-p8``: its tokenizer also feeds demo-t2i, and an encoder that never saw a scene hurts
there; docs/t2i.md). ``dinov2-mixed-p8`` learns scenes as well (half of each batch; targets: counts per kind,
colours present, each patch's object kind): after 4000 steps (757 s single-threaded) its head classifies 84.8%
of held-out shapes and the kind of 87.8% of held-out scene patches, yet as the demo's encoder it gave 23.8 dB,
recognised samples 40.3% / 26.3%, latent probe 58.8%, and demo-t2i GenEval 0.146 (tokenizer ceiling 0.134)
against 0.202 with ``-p8``; so it is a named recipe, trained on first use, not shipped. Each directory's
``standin.json`` records its held-out accuracy; :func:`probe_standin_encoder` measures the probe against
a random initialisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from aligntok.config import ConfigError
from aligntok.data.scenes import SCENE_COLOURS, SCENE_KINDS
from aligntok.eval.images import from_uint8
from aligntok.standins.cache import (
    INFO_FILE,
    ensure_cached,
    read_standin_info,
    select_preset,
    training_device,
)
from aligntok.standins.recipe import (
    HEAD_WIDTH,
    HELDOUT_SEED,
    SCENE_COUNT_CLASSES,
    RecipeSettings,
    ScenesInMemory,
    ShapesInMemory,
    attribute_loss,
    heldout,
    scene_loss,
    split_heads,
    train_loop,
)

if TYPE_CHECKING:
    from transformers import Dinov2Model

#: ``model.encoder=standin:NAME`` names a stand-in encoder (see :func:`resolve_encoder_spec`).
STANDIN_PREFIX = "standin:"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # a real DINOv2's pixel normalisation, kept for the stand-in
_IMAGENET_STD = (0.229, 0.224, 0.225)
_PIXEL_CELLS = 4  # per patch side: the dense target is each patch's colours at 4x4 cells


@dataclasses.dataclass
class StandinEncoderSettings(RecipeSettings):
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
class MixedEncoderSettings(StandinEncoderSettings):
    """A stand-in that also learns builtin:scenes (several small objects), as DINOv2 learns from varied data:
    each batch holds ``scenes_per_batch`` scenes (targets: :class:`ScenesInMemory`) besides the shapes."""

    scenes_per_batch: int = 32  #: of ``batch_size``
    scenes_size: int = 6400  #: distinct scenes, rendered once into memory
    scene_weight: float = 1.0  #: weight of the scene terms (counts per kind, colours, per-patch kind)

    def validate(self) -> None:
        super().validate()
        if not 0 < self.scenes_per_batch < self.batch_size or self.scenes_size <= 0 or self.scene_weight < 0:
            raise ConfigError("need 0 < scenes_per_batch < batch_size, scenes_size > 0 and scene_weight >= 0")


#: Named stand-in encoders, also for ``model.encoder=standin:NAME``: the default fits the demo's first-run
#: budget; "-long" (~4.5 min on 2 cores) is for runs that can afford a stronger encoder.
STANDIN_ENCODERS: dict[str, StandinEncoderSettings] = {
    "dinov2-shapes": StandinEncoderSettings(),
    "dinov2-shapes-long": StandinEncoderSettings(steps=3000, data_size=12800),
    # Shipped (aligntok.standins.build): 8 px patches give an 8x8 token grid at 64 px, the demo's latent grid.
    # "-p8" (standard data, 600 steps; the demo's, and docs/reproduction-t2i's) is hardly semantic.
    "dinov2-shapes-p8": StandinEncoderSettings(hidden_size=96, patch_size=8, batch_size=32, steps=600),
    # The reproduction's encoder: trained on its data (builtin:shapes-centered), long enough to be semantic.
    "dinov2-centered-p8": StandinEncoderSettings(hidden_size=96, patch_size=8, steps=4000, data_size=12800,
                                                 difficulty="centered"),
    # Centred shapes and scenes half and half (not shipped: it did not help the demos; module docstring).
    "dinov2-mixed-p8": MixedEncoderSettings(hidden_size=96, patch_size=8, steps=4000, data_size=12800,
                                            difficulty="centered"),
}


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

    device = training_device()
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(settings.init_seed)
        model = _build_dinov2(settings).to(device)
        # DINOv2's linear-evaluation feature (CLS ++ mean patch token) feeds the attribute heads.
        heads = nn.Linear(2 * settings.hidden_size, HEAD_WIDTH).to(device)
        pixel_head = nn.Linear(settings.hidden_size, 3 * _PIXEL_CELLS**2).to(device)

        mixed = isinstance(settings, MixedEncoderSettings)
        if mixed:  # made after the others, so a shapes-only recipe's initialisation is unchanged
            scene_heads = nn.Linear(2 * settings.hidden_size, len(SCENE_KINDS) * SCENE_COUNT_CLASSES
                                    + len(SCENE_COLOURS)).to(device)
            token_head = nn.Linear(settings.hidden_size, 1 + len(SCENE_KINDS)).to(device)

        def forward(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """-> (DINOv2's linear-evaluation feature, patch tokens)."""
            tokens = model(pixel_values=_normalise_for_dinov2(images)).last_hidden_state
            cls, patches = tokens[:, 0], tokens[:, 1:]
            return torch.cat([cls, patches.mean(dim=1)], dim=1), patches

        def step_loss(images: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            images, targets = images.to(device), {k: v.to(device) for k, v in targets.items()}
            features, patches = forward(images)
            shapes = len(targets["label"])  # the shapes come first, any scenes after them
            loss, logs = attribute_loss(heads(features[:shapes]), targets, settings.attribute_weight)
            pixel_mse = F.mse_loss(pixel_head(patches), _patch_colours(images, settings.patch_size))
            logs["pixel_mse"] = pixel_mse.item()
            loss = loss + settings.pixel_weight * pixel_mse
            if mixed:
                scene = {k.removeprefix("scene/"): v for k, v in targets.items() if k.startswith("scene/")}
                term, scene_logs = scene_loss(scene_heads(features[shapes:]), token_head(patches[shapes:]), scene)
                loss = loss + settings.scene_weight * term
                logs.update(scene_logs)
            return loss, logs

        params = [*model.parameters(), *heads.parameters(), *pixel_head.parameters()]
        if mixed:
            params += [*scene_heads.parameters(), *token_head.parameters()]
        model.train()
        scenes = (settings.scenes_per_batch, settings.scenes_size, settings.patch_size) if mixed else None
        record = train_loop(step_loss, params, settings, progress=progress, desc="stand-in DINOv2", scenes=scenes)
        model.eval()
        images, labels = heldout(settings)
        with torch.no_grad():
            logits = torch.cat([
                split_heads(heads(forward(from_uint8(x).to(device))[0]))["label"].cpu() for x in images.split(250)
            ])
            record["heldout_class_accuracy"] = (logits.argmax(1) == labels).float().mean().item()
            if mixed:  # held-out scenes: the per-patch object kind (0 = background)
                held = ScenesInMemory.render(HELDOUT_SEED, settings.heldout_size, settings.resolution,
                                             settings.patch_size)
                kinds = torch.cat([token_head(forward(from_uint8(x).to(device))[1]).argmax(-1).cpu()
                                   for x in held.images.split(250)])
                record["heldout_scene_token_kind_accuracy"] = (
                    (kinds == held.targets["token_kind"].flatten(1)).float().mean().item())
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
    settings: StandinEncoderSettings | str | None = None, *, progress: bool = True, root: Path | None = None
) -> Path:
    """Directory of the stand-in DINOv2 for ``settings``: a recipe or a :data:`STANDIN_ENCODERS` name
    (default ``dinov2-shapes``, ~45 s on 2 CPU cores on first use, then cached).

    Load it with ``aligntok.models.encoders.load_encoder(path)``, or pass ``model.encoder=<path>``.
    Shipped recipes come from the package; ``root`` builds under that folder instead (:mod:`.cache`).
    """
    settings = select_preset(STANDIN_ENCODERS, "stand-in encoder", settings, "dinov2-shapes")
    return ensure_cached(
        "encoder", settings, lambda staging: _train_standin_encoder(settings, staging, progress), progress=progress,
        root=root,
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
    difficulty: str | None = None,
) -> dict[str, Any]:
    """Linear-probe accuracy of the encoder's average-pooled patch tokens on held-out builtin images.

    Images of seed ``seed`` (not the training images of seed 0) at the encoder's training resolution:
    the first ``num_train`` fit :func:`aligntok.eval.probe.linear_probe`, the next ``num_test`` score it.
    ``stride`` (default: the patch size, i.e. native resolution) is passed to ``load_encoder``. With
    ``compare_random`` the same architecture with random weights is probed too: the baseline to beat.
    ``difficulty``: the builtin:shapes preset of the images (default: the one the stand-in was trained on,
    from its ``standin.json``; ``standard`` for a directory without one).
    """
    from aligntok.eval.probe import linear_probe
    from aligntok.models.encoders import (
        FoundationEncoder,
        build_encoder_from_config,
        load_encoder,
    )

    hf_config = json.loads((Path(path) / "config.json").read_text())
    encoder = load_encoder(str(path), stride=stride or hf_config["patch_size"]).eval()
    resolution = hf_config["image_size"]
    if difficulty is None:
        recorded = read_standin_info(path)["settings"] if (Path(path) / INFO_FILE).is_file() else {}
        difficulty = recorded.get("difficulty", "standard")
    data = ShapesInMemory.render(seed, num_train + num_test, resolution, difficulty)
    labels = data.targets["label"]

    def score(net: FoundationEncoder) -> dict[str, Any]:
        pooled = torch.cat([net(from_uint8(x)).mean(dim=(2, 3)) for x in data.images.split(250)])
        return linear_probe(pooled[:num_train], labels[:num_train], pooled[num_train:], labels[num_train:])

    result: dict[str, Any] = {"standin": score(encoder), "resolution": resolution, "seed": seed,
                              "difficulty": difficulty}
    if compare_random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random = build_encoder_from_config("dinov2", encoder.hf_config.to_dict(), stride=encoder.stride)
        random.pixel_mean.copy_(encoder.pixel_mean)
        random.pixel_std.copy_(encoder.pixel_std)
        result["random_init"] = score(random.eval())
    return result
