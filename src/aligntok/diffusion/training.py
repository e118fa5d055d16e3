"""Training LightningDiT on the tokenizer's latents, on the one training engine.

Latents come from a latent cache (``aligntok cache-latents``; the random horizontal flip picks the
cached latent of the flipped image) or from images encoded on the fly by a frozen tokenizer. Either
way they are normalised per channel with the dataset statistics before the DiT sees them, and the
loss is the transport's (rectified flow, velocity target, log-normal t, MSE + cosine term).

``train_dit(cfg, run_dir)`` trains in ``run_dir/train`` (log, resolved config, checkpoints; re-running
resumes exactly, as every engine run does) and exports the EMA weights (the raw weights when
``train.ema_decay`` is 0) as ``run_dir/model``, a :meth:`LightningDiT.save_pretrained` directory that also
records the latent statistics the DiT was trained with (so re-caching latents, which rewrites the
tokenizer's statistics, cannot change how its samples are de-normalised) and the ``sample`` settings
``aligntok sample`` starts from.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from aligntok.config import ConfigError, OptimConfig, TrainConfig, config_to_dict
from aligntok.diffusion.samplers import SamplerConfig
from aligntok.diffusion.transport import Transport, TransportConfig
from aligntok.models.lightningdit import (
    LIGHTNINGDIT_PRESETS,
    LightningDiT,
    LightningDiTConfig,
)

log = logging.getLogger(__name__)

#: Fields a preset fixes; the rest of the model config (channels, latent size, options) comes from ``model``.
PRESET_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size")


@dataclasses.dataclass
class DiTDataConfig:
    """Where training latents come from: a latent cache, or images encoded on the fly."""

    cache: str | None = None  #: latent cache directory written by `aligntok cache-latents` (set this or `train`)
    train: str | None = None  #: image data spec to encode on the fly with `tokenizer` (set this or `cache`)
    tokenizer: str | None = None  #: tokenizer directory or hub id for on-the-fly encoding; its config holds the latent stats
    resolution: int = 256  #: on the fly: square image side in pixels (latent side = resolution / stride)
    hflip: bool = True  #: random horizontal flip (cache: use the flipped image's latent; images: flip before encoding)
    num_workers: int = 2  #: DataLoader workers per rank
    builtin_size: int = 10000  #: on the fly: number of images a builtin:NAME dataset holds

    def validate(self) -> None:
        if bool(self.cache) == bool(self.train):
            raise ConfigError("set exactly one of cache (a latent cache) and train (images encoded on the fly)")
        if self.train and not self.tokenizer:
            raise ConfigError("train (on-the-fly encoding) needs tokenizer")
        if self.cache and self.tokenizer:
            raise ConfigError("tokenizer is only used with train; a latent cache carries its own statistics")
        if self.resolution <= 0 or self.num_workers < 0 or self.builtin_size <= 0:
            raise ConfigError("resolution and builtin_size must be positive, num_workers >= 0")


@dataclasses.dataclass
class DiTLoopConfig(TrainConfig):
    """The engine's training loop plus what only DiT training offers."""

    compile: bool = False  #: torch.compile the DiT's transformer blocks (as the reference); checkpoints keep plain names. Inductor on CPU needs a C++ compiler


@dataclasses.dataclass
class DiTTrainConfig:
    """Everything `aligntok train-dit` needs. Defaults: the paper's LightningDiT-XL/1 recipe."""

    preset: str | None = None  #: a LightningDiT preset (e.g. LightningDiT-XL/1) fixing depth, width, heads, patch; unset = model's
    model: LightningDiTConfig = dataclasses.field(default_factory=LightningDiTConfig)  #: architecture
    transport: TransportConfig = dataclasses.field(default_factory=TransportConfig)  #: t sampling and loss terms
    data: DiTDataConfig = dataclasses.field(default_factory=DiTDataConfig)  #: latent cache or images
    train: DiTLoopConfig = dataclasses.field(
        default_factory=lambda: DiTLoopConfig(batch_size=1024, ema_decay=0.9999)
    )  #: loop, batch, precision, EMA, checkpoints, compile
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.9, 0.95))
    )  #: AdamW of the DiT (reference: lr 2e-4, beta2 0.95, no weight decay)
    sample: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)  #: recorded with the model: how `aligntok sample` samples it unless told otherwise

    def validate(self) -> None:
        if not self.preset:
            return
        if self.preset not in LIGHTNINGDIT_PRESETS:
            raise ConfigError(f"preset={self.preset!r} is not one of {', '.join(LIGHTNINGDIT_PRESETS)}")
        # A size field left at its default yields to the preset; one set to something else contradicts it.
        defaults = LightningDiTConfig()
        preset_sizes = dict(zip(PRESET_FIELDS, LIGHTNINGDIT_PRESETS[self.preset], strict=True))
        clashes = [
            f"model.{name}={getattr(self.model, name)}"
            for name in PRESET_FIELDS
            if getattr(self.model, name) not in (getattr(defaults, name), preset_sizes[name])
        ]
        if clashes:
            raise ConfigError(f"{', '.join(clashes)} contradicts preset={self.preset}; set the preset or the sizes, not both")

    def model_config(self) -> LightningDiTConfig:
        """The architecture to build: the preset's sizes with the model section's other fields."""
        if not self.preset:
            return self.model
        others = {f.name: getattr(self.model, f.name) for f in dataclasses.fields(LightningDiTConfig) if f.name not in PRESET_FIELDS}
        return LightningDiTConfig.from_preset(self.preset, **others)


class LatentDiffusionTask:
    """What every diffusion model on a frozen tokenizer's latents shares as an engine task: one module
    (``model``) with one optimizer and one EMA; the tokenizer (when images are encoded on the fly) frozen,
    in eval mode and never checkpointed. Subclasses define ``losses``."""

    model: nn.Module
    tokenizer: nn.Module | None

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizers(self) -> dict[str, list[nn.Parameter]]:
        return {"model": [p for p in self.model.parameters() if p.requires_grad]}

    def ema_modules(self) -> list[str]:
        return ["model"]

    def train_mode(self) -> None:
        self.model.train()  # label / caption dropout for guidance is on in train mode
        if self.tokenizer is not None:
            self.tokenizer.eval()


class DiTTask(LatentDiffusionTask):
    """LightningDiT training as an engine task: one optimizer, one EMA, the transport's loss.

    ``batch`` holds either cached latents (``latent`` and ``latent_flip``) or ``image``s that the frozen
    ``tokenizer`` encodes. ``normalize`` maps tokenizer latents to the DiT's (per-channel) space.
    """

    def __init__(
        self,
        model: LightningDiT,
        transport: Transport,
        normalize: Callable[[torch.Tensor], torch.Tensor],
        *,
        hflip: bool,
        tokenizer: nn.Module | None = None,
    ) -> None:
        self.model, self.transport, self.normalize = model, transport, normalize
        self.hflip = hflip
        self.tokenizer = tokenizer
        if tokenizer is not None:
            tokenizer.requires_grad_(False).eval()  # a frozen encoder, never checkpointed

    def latents(self, batch: dict) -> torch.Tensor:
        """The normalised clean latents of a batch (fp32)."""
        if "latent" in batch:
            z = batch["latent"]
            if self.hflip:
                flip = torch.rand(z.shape[0], device=z.device) < 0.5
                z = torch.where(flip[:, None, None, None], batch["latent_flip"], z)
        elif self.tokenizer is not None:
            # The tokenizer encodes in fp32 whatever precision the DiT trains in.
            with torch.no_grad(), torch.autocast(batch["image"].device.type, enabled=False):
                z = self.tokenizer.encode(batch["image"].float())
        else:
            raise ValueError(f"batch holds neither cached latents nor images to encode (keys: {sorted(batch)})")
        return self.normalize(z.float())

    def losses(self, batch: dict, step: int) -> dict[str, tuple[torch.Tensor, dict]]:
        labels = batch["label"]
        low, high = torch.stack(torch.aminmax(labels)).tolist()
        if low < 0 or high >= self.model.num_classes:
            raise ValueError(
                f"class labels span [{low}, {high}] but the model has num_classes={self.model.num_classes} "
                "(-1 means the data has no class labels: use class subfolders or .cls entries)"
            )
        loss, logs = self.transport.loss(self.model, self.latents(batch), {"y": labels})
        logs = {k: v for k, v in logs.items() if k != "loss"}  # the engine logs the total itself
        return {"model": (loss, logs)}


def _check_latents_fit(model: LightningDiTConfig, shape: tuple[int, ...], num_classes: int, source: str) -> None:
    channels, height, width = shape
    if height != width:
        raise ConfigError(f"{source} gives {height}x{width} latents; LightningDiT needs square ones")
    if (model.in_channels, model.input_size) != (channels, height):
        raise ConfigError(
            f"model.in_channels={model.in_channels}, model.input_size={model.input_size} do not fit {source}'s "
            f"latents ({channels} channels, {height}x{width}): set model.in_channels={channels} model.input_size={height}"
        )
    if num_classes > model.num_classes:
        raise ConfigError(f"{source} has {num_classes} classes but model.num_classes={model.num_classes}")


def _per_channel(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def train_dit(cfg: DiTTrainConfig, run_dir: str | Path) -> Path:
    """Train (or resume) a LightningDiT in ``run_dir/train`` and export it to ``run_dir/model``; returns the latter.

    Call on every rank under torchrun. Raises a one-line :class:`ConfigError` when the model does not fit
    the latents (channels, side, classes) and ValueError for data without labels or statistics.
    """
    from aligntok.data import build_dataset, build_loader
    from aligntok.data.latent_dataset import LatentDataset
    from aligntok.models.lightningdit import build_from_state_dict
    from aligntok.training.distributed import init_distributed
    from aligntok.training.trainer import Trainer

    run_dir = Path(run_dir)
    dist = init_distributed()
    if cfg.train.compile and not LightningDiT.can_compile(dist.device):
        raise ConfigError("train.compile=true on the CPU needs a C++ compiler (c++, g++ or clang++; or set CXX)")
    model_cfg = cfg.model_config()
    tokenizer = None
    if cfg.data.cache:
        dataset = LatentDataset(cfg.data.cache)
        _check_latents_fit(model_cfg, dataset.latent_shape, dataset.num_classes, f"latent cache {cfg.data.cache}")
        if dataset.metadata["label_range"][0] < 0:
            raise ValueError(f"latent cache {cfg.data.cache} holds images without class labels (label -1)")
        stats = {"mean": list(dataset.metadata["latent_mean"]), "std": list(dataset.metadata["latent_std"])}
        mean, std = _per_channel(stats["mean"], dist.device), _per_channel(stats["std"], dist.device)

        def normalize(z: torch.Tensor) -> torch.Tensor:
            return (z - mean) / std
    else:
        from aligntok.models.tokenizer import AlignTokTokenizer

        tokenizer = AlignTokTokenizer.from_pretrained(cfg.data.tokenizer, map_location=dist.device)
        if tokenizer.config.latent_mean is None:
            raise ValueError(
                f"tokenizer {cfg.data.tokenizer} has no latent statistics: run `aligntok cache-latents --tokenizer "
                f"{cfg.data.tokenizer} --data ...` once (it records them), or train from that cache"
            )
        if cfg.data.resolution % tokenizer.stride:
            raise ConfigError(f"data.resolution={cfg.data.resolution} is not a multiple of the tokenizer stride {tokenizer.stride}")
        side = cfg.data.resolution // tokenizer.stride
        dataset = build_dataset(
            cfg.data.train, cfg.data.resolution, hflip=cfg.data.hflip, seed=cfg.train.seed, builtin_size=cfg.data.builtin_size
        )
        shape = (tokenizer.latent_channels, side, side)
        _check_latents_fit(model_cfg, shape, int(getattr(dataset, "num_classes", 0)), f"tokenizer {cfg.data.tokenizer}")
        normalize = tokenizer.normalize_latents
        stats = {"mean": list(tokenizer.config.latent_mean), "std": list(tokenizer.config.latent_std)}

    torch.manual_seed(cfg.train.seed)  # the initial weights (rank 0's are broadcast by the engine)
    model = LightningDiT(model_cfg)
    task = DiTTask(
        model, Transport(cfg.transport), normalize, hflip=cfg.data.hflip and tokenizer is None, tokenizer=tokenizer
    )
    per_rank = cfg.train.batch_size // dist.world_size

    def loader_factory(start_step: int):
        return build_loader(
            dataset, per_rank, rank=dist.rank, world_size=dist.world_size, seed=cfg.train.seed,
            num_workers=cfg.data.num_workers, start_step=start_step,
        )

    started = time.perf_counter()
    trainer = Trainer(
        task, train=cfg.train, optim={"model": cfg.optim}, loader_factory=loader_factory,
        out_dir=run_dir / "train", run_config=cfg, dist=dist,
    )
    if cfg.train.compile:
        # After the engine has taken its EMA copy: a deep copy would share the compiled callables, which
        # stay bound to the live blocks. Compiling in place leaves parameters and state-dict names alone.
        model.compile_repeated_blocks()
    result = trainer.fit()
    # Full (gathered) weights work for replicated and FSDP-sharded training alike; collective.
    state = trainer.ema_state_dict("model") if "model" in trainer.emas else trainer.model_state_dict("model")
    out = run_dir / "model"
    if dist.is_main:
        exported = build_from_state_dict(model_cfg, state, source="the trained model")
        exported.latent_stats, exported.sampler_settings = stats, config_to_dict(cfg.sample)
        exported.save_pretrained(out)
        log.info("LightningDiT: %d steps in %.1f s -> %s", result.step, time.perf_counter() - started, out)
    dist.barrier()
    return out
