"""The built-in evaluation network: plays Inception's role on builtin:shapes.

Independent of the foundation encoder by construction: a CNN (a stem and torchvision ResNet
``BasicBlock`` stages, BatchNorm, global-average-pooled features) rather than a ViT, another
initialisation seed and its own batch order, trained on the same data and attribute targets
(:mod:`.recipe`). Its ``pool`` features give a Fréchet distance (:func:`builtin_fd`), its class logits
the class accuracy of generated samples (:func:`builtin_class_accuracy`); :func:`evaluate_builtin` gives
both in one pass. It is an :class:`aligntok.eval.features.FeatureNetwork`, so
``evaluate_generation(..., inception=net)`` accepts it as well. A CNN learns this data several times
faster than a ViT, which is why the judge is one. Held-out class accuracy (recipe version 1): 900 steps
(~45 s) 35%, a weak judge; 3000 steps (~2.5 min on idle cores) 87%.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aligntok.config import ConfigError
from aligntok.data.builtin import SHAPE_NAMES
from aligntok.eval.features import ImageInput, ModuleFeatures, extract_features
from aligntok.eval.fid import FeatureStats, frechet_distance
from aligntok.standins.cache import ensure_cached, select_preset, training_device
from aligntok.standins.recipe import (
    HEAD_LAYOUT,
    HEAD_WIDTH,
    HELDOUT_SEED,
    RecipeSettings,
    attribute_loss,
    heldout,
    split_heads,
    train_loop,
)

EVAL_WEIGHTS_FILE = "model.safetensors"
EVAL_CONFIG_FILE = "config.json"
_CONV_LAYOUT = torch.channels_last


@dataclasses.dataclass
class EvalNetworkSettings(RecipeSettings):
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



#: Named evaluation networks: the default fits the demo's budget; "shapes-long" (~2.5 min) is far more accurate.
EVAL_NETWORKS: dict[str, EvalNetworkSettings] = {
    "shapes": EvalNetworkSettings(),
    "shapes-long": EvalNetworkSettings(steps=3000, data_size=12800),
    # Shipped (aligntok.standins.build): the demo's judge on builtin:shapes-easy, 96.8% held-out class accuracy.
    # Measured on easy data: lr 1e-2 (the short recipes' value) reaches 27% after 600 steps and 51% after
    # 1500; lr 2e-3 42% after 600; 4000 steps on 12,800 images: lr 1e-3 94.8%, lr 2e-3 96.8%.
    "shapes-easy": EvalNetworkSettings(difficulty="easy", steps=4000, lr=2e-3, data_size=12800),
}


def build_eval_backbone(widths: tuple[int, ...] | list[int], stem_stride: int) -> nn.Sequential:
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
        return {"pool": pool, "logits": split_heads(self.heads(pool))["label"]}

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

    device = training_device()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.init_seed)
        # channels_last: oneDNN's faster convolution layout on CPU (~1.5x here); no effect on the result.
        backbone = build_eval_backbone(settings.widths, settings.stem_stride).to(device, memory_format=_CONV_LAYOUT)
        heads = nn.Linear(settings.widths[-1], HEAD_WIDTH).to(device)

        def step_loss(images: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            targets = {k: v.to(device) for k, v in targets.items()}
            features = backbone(images.to(device).contiguous(memory_format=_CONV_LAYOUT))
            return attribute_loss(heads(features), targets, settings.attribute_weight)

        backbone.train()
        record = train_loop(step_loss, [*backbone.parameters(), *heads.parameters()], settings,
                             progress=progress, desc="evaluation CNN")

    weights = staging / EVAL_WEIGHTS_FILE
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"heads.{k}": v for k, v in heads.state_dict().items()})
    save_file({k: v.detach().cpu().contiguous(memory_format=torch.contiguous_format) for k, v in state.items()},
              str(weights))
    config = {"architecture": "aligntok.standins eval CNN", "widths": list(settings.widths),
              "stem_stride": settings.stem_stride, "resolution": settings.resolution,
              "head_layout": HEAD_LAYOUT, "class_names": list(SHAPE_NAMES)}
    (staging / EVAL_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    network = load_eval_network(staging).to(device)
    images, labels = heldout(settings)
    record["heldout_class_accuracy"] = builtin_class_accuracy(images, labels, network=network)
    record["heldout"] = {"seed": HELDOUT_SEED, "num_images": len(labels)}
    return record


def ensure_eval_network(settings: EvalNetworkSettings | str | None = None, *, progress: bool = True,
                        root: Path | None = None) -> Path:
    """Directory of the built-in evaluation network for ``settings``: a recipe or an :data:`EVAL_NETWORKS`
    name (default ``shapes``, ~40 s on 2 CPU cores on first use, then cached). Shipped recipes come from
    the package; ``root`` builds under that folder instead (:mod:`.cache`)."""
    settings = select_preset(EVAL_NETWORKS, "evaluation network", settings, "shapes")
    return ensure_cached(
        "eval", settings, lambda staging: _train_eval_network(settings, staging, progress), progress=progress,
        root=root,
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
    if config.get("head_layout") != HEAD_LAYOUT:
        raise ValueError(f"{path}: evaluation network heads {config.get('head_layout')} differ from {HEAD_LAYOUT}")
    backbone = build_eval_backbone(config["widths"], config["stem_stride"])
    heads = nn.Linear(config["widths"][-1], HEAD_WIDTH)
    state = load_file(str(weights))
    try:
        backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
        heads.load_state_dict({k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")})
    except RuntimeError as e:
        raise ValueError(f"{weights}: weights do not fit the configured network ({str(e).splitlines()[0]})") from None
    network = BuiltinEvalNetwork(backbone, heads, resolution=config["resolution"], weights_path=weights)
    return network.to(device) if device is not None else network


def resolve_network(network: BuiltinEvalNetwork | None, device: str | torch.device | None) -> BuiltinEvalNetwork:
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
    network = resolve_network(network, device)
    pools = [extract_features(network, x, batch_size=batch_size)["pool"] for x in (samples, refs)]
    return _frechet(*pools)


def builtin_class_accuracy(
    samples: ImageInput, labels: Any, *, network: BuiltinEvalNetwork | None = None,
    batch_size: int = 250, device: str | torch.device | None = None,
) -> float:
    """Fraction of ``samples`` the evaluation network classifies as their ``labels`` (the class asked for)."""
    network = resolve_network(network, device)
    return _accuracy(extract_features(network, samples, batch_size=batch_size)["logits"], labels)


def evaluate_builtin(
    samples: ImageInput, labels: Any, refs: ImageInput, *, network: BuiltinEvalNetwork | None = None,
    batch_size: int = 250, device: str | torch.device | None = None,
) -> dict[str, Any]:
    """FD (vs ``refs``) and class accuracy (vs ``labels``) of generated ``samples`` in one feature pass."""
    network = resolve_network(network, device)
    sample_features = extract_features(network, samples, batch_size=batch_size)
    ref_pool = extract_features(network, refs, batch_size=batch_size)["pool"]
    return {
        "fd": _frechet(sample_features["pool"], ref_pool),
        "class_accuracy": _accuracy(sample_features["logits"], labels),
        "num_samples": int(sample_features["pool"].shape[0]),
        "num_references": int(ref_pool.shape[0]),
        "network": network.describe(),
    }


