"""Training the text-to-image transformer on tokenizer latents, on the one training engine.

Rectified flow in aligntok's convention (:mod:`.transport`: t = 0 noise) with logit-normal t moved by a
resolution-dependent shift: FLUX's ``mu`` is linear in the image token count (0.5 at 256 tokens, 1.15 at
4096) and shifts sigma by ``S = exp(mu)``; in aligntok's time that is the sampler's shift
``t -> s t / (1 + (s - 1) t)`` with ``s = 1 / S`` (:func:`.transport.resolution_shift`). Plain MSE by default
(``transport.cosine_weight: 0``), as FLUX and SD3 train.

Per step: images are encoded by the frozen tokenizer (or latents come from a cache), normalised per
channel; captions are dropped to "" with probability ``text.caption_dropout`` by a pure function of
(seed, step, sample index) (:func:`caption_dropped`), so resume is exact and the decision does not depend
on the number of processes; the kept captions are encoded on the fly by the frozen text encoders.

``train_t2i(cfg, run_dir)`` trains in ``run_dir/train`` and exports the EMA weights to ``run_dir/model``
(:meth:`T2ITransformer.save_pretrained`), recording the latent statistics, the text encoders, the
tokenizer, the training resolution and the shift beside the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aligntok.config import ConfigError, OptimConfig, TrainConfig
from aligntok.diffusion.training import LatentDiffusionTask
from aligntok.diffusion.transport import (
    Transport,
    TransportConfig,
    resolution_shift,
    shift_time,
)
from aligntok.models.t2i import PRESET_FIELDS, T2I_PRESETS, T2IConfig, T2ITransformer
from aligntok.models.text import TextConditioner, TextConfig

log = logging.getLogger(__name__)

_SEED_MASK = (1 << 64) - 1
_DROPOUT_TAG = 0xD20F  # own stream: never shared with flips or data order


def caption_dropped(seed: int, step: int, keys: list[int], rate: float) -> list[bool]:
    """Whether each caption of global step ``step`` is dropped: a pure function of (seed, step, key)."""
    if rate <= 0:
        return [False] * len(keys)
    draws = [np.random.default_rng([_DROPOUT_TAG, seed & _SEED_MASK, step & _SEED_MASK, k & _SEED_MASK]).random()
             for k in keys]
    return [bool(d < rate) for d in draws]


@dataclasses.dataclass
class T2IDataConfig:
    """Images with captions encoded on the fly by a frozen tokenizer, or a latent cache with captions."""

    train: str | None = None  #: data spec: builtin:NAME, a folder with .txt sidecars, WebDataset shards (KEY.txt)
    cache: str | None = None  #: or a latent cache made by `cache-latents --captions` with data.tokenizer
    tokenizer: str = "runs/tiny/stage3"  #: tokenizer directory (its stride decides packing; f8 VAEs are packed 2x2)
    build_tokenizer: str | None = None  #: a tokenizer config: trained into tokenizer's run folder when that is missing
    resolution: int = 256  #: square image side in pixels (a multiple of the tokenizer stride)
    hflip: bool = False  #: random horizontal flips; built-in captions swap left/right, others are kept (off for web data)
    num_workers: int = 2  #: DataLoader workers per rank
    builtin_size: int = 10000  #: images in a builtin:NAME dataset
    stats_samples: int = 256  #: images whose latents give the per-channel statistics when the tokenizer has none
    buckets: list[str] = dataclasses.field(default_factory=list)  #: aspect ratios W/H (e.g. 4/5) at resolution**2 area; [] = square crops

    def validate(self) -> None:
        if bool(self.train) == bool(self.cache):
            raise ConfigError("set exactly one of train (images encoded on the fly) and cache (cache-latents --captions)")
        if self.cache and self.buckets:
            raise ConfigError("a latent cache is square: buckets need images (data.train)")
        if self.resolution <= 0 or self.num_workers < 0 or self.builtin_size <= 0 or self.stats_samples < 2:
            raise ConfigError("resolution and builtin_size must be positive, num_workers >= 0, stats_samples >= 2")


@dataclasses.dataclass
class T2ITextConfig(TextConfig):
    """The frozen text encoders and caption dropout for classifier-free guidance."""

    caption_dropout: float = 0.1  #: probability a caption becomes "" (the null caption guidance uses)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout={self.caption_dropout} must be in [0, 1)")


@dataclasses.dataclass
class T2IValidationConfig:
    """Prompts rendered with the EMA weights into ``RUN/train/validation/step-NNNNNNN.png`` during training."""

    prompts: list[str] = dataclasses.field(default_factory=list)  #: fixed prompts; prompt i seeded from (seed, i)
    every: int = 0  #: render at checkpoints whose step is a multiple of this (and at the end); 0 = never
    steps: int = 20  #: Euler steps
    cfg_scale: float = 4.0  #: guidance against the empty caption
    seed: int = 0  #: noise seed

    def validate(self) -> None:
        if self.every < 0 or self.steps < 1:
            raise ConfigError("validation.every must be >= 0 and validation.steps >= 1")


@dataclasses.dataclass
class T2ITrainConfig:
    """Everything `aligntok train-t2i` needs. Defaults: FLUX-tiny on built-in scenes."""

    init_from: str | None = None  #: a T2I model directory whose weights start a fresh run (e.g. 512 px from 256 px)
    preset: str | None = "FLUX-tiny"  #: a T2I preset fixing the depth and heads; unset = the model section's sizes
    model: T2IConfig = dataclasses.field(default_factory=T2IConfig)  #: in_channels, pack, text_dim, pooled_dim are derived
    text: T2ITextConfig = dataclasses.field(default_factory=T2ITextConfig)  #: text encoders and caption dropout
    data: T2IDataConfig = dataclasses.field(default_factory=T2IDataConfig)  #: images, captions, tokenizer
    transport: TransportConfig = dataclasses.field(default_factory=lambda: TransportConfig(cosine_weight=0.0))
    shift: float = 0.0  #: training time shift s (aligntok convention, s < 1 towards noise); 0 = FLUX's rule for the token count
    #: Image pixels per transformer token side: latents are packed (token_pixels / stride)^2 per token. 16 is
    #: FLUX's (f8 VAE packed 2x2) and the paper's (f16 AlignTok unpacked), so compared tokenizers cost the same;
    #: 8 keeps an f8 latent unpacked (4x the tokens), as tiny 64-px demos need.
    token_pixels: int = 16
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(batch_size=32, ema_decay=0.999))
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=100, grad_clip=1.0))
    validation: T2IValidationConfig = dataclasses.field(default_factory=T2IValidationConfig)  #: grids during training

    def validate(self) -> None:
        if self.preset is not None and self.preset not in T2I_PRESETS:
            raise ConfigError(f"preset={self.preset!r} is not one of {', '.join(T2I_PRESETS)}")
        if self.shift < 0:
            raise ConfigError(f"shift={self.shift} must be >= 0 (0 = resolution-dependent)")
        if self.token_pixels <= 0:
            raise ConfigError(f"token_pixels={self.token_pixels} must be positive")

    def model_config(self, *, in_channels: int, pack: int, text_dim: int, pooled_dim: int) -> T2IConfig:
        """The architecture: the preset's sizes (or the model section's) with the derived widths."""
        derived = {"in_channels": in_channels, "pack": pack, "text_dim": text_dim, "pooled_dim": pooled_dim}
        if not self.preset:
            config = dataclasses.replace(self.model, **derived)
            config.validate()
            return config
        others = {f.name: getattr(self.model, f.name) for f in dataclasses.fields(T2IConfig)
                  if f.name not in PRESET_FIELDS and f.name not in derived}
        return T2IConfig.from_preset(self.preset, **others, **derived)

    def time_shift(self, num_tokens: int) -> float:
        return self.shift if self.shift > 0 else resolution_shift(num_tokens)


class T2ITask(LatentDiffusionTask):
    """T2I training as an engine task: one optimizer, one EMA, the transport's loss on shifted t."""

    def __init__(self, model: T2ITransformer, transport: Transport, tokenizer: nn.Module, text: TextConditioner,
                 normalize, *, caption_dropout: float, seed: int, shift: float, hflip: bool = False) -> None:
        self.model, self.transport, self.tokenizer, self.text = model, transport, tokenizer, text
        self.hflip = hflip  # cached latents only: images are flipped by the dataset
        self.normalize, self.caption_dropout, self.seed, self.shift = normalize, caption_dropout, seed, shift
        tokenizer.requires_grad_(False).eval()

    def latents_and_captions(self, batch: dict) -> tuple[torch.Tensor, list[str]]:
        """Normalised latents (fp32) and their captions: cached (flipped with the flipped image's caption) or
        encoded now."""
        captions = list(batch["caption"])
        with torch.no_grad(), torch.autocast(batch.get("image", batch.get("latent")).device.type, enabled=False):
            if "latent" in batch:
                z = batch["latent"]
                if self.hflip:
                    flip = torch.rand(z.shape[0], device=z.device) < 0.5
                    z = torch.where(flip[:, None, None, None], batch["latent_flip"], z)
                    captions = [f if d else c for c, f, d in zip(captions, batch["caption_flip"], flip.tolist(), strict=True)]
            else:
                z = self.tokenizer.encode(batch["image"].float())
            return self.normalize(z.float()), captions

    def dropped(self, batch: dict, captions: list[str], step: int) -> list[str]:
        """``captions`` after dropout; keyed by dataset index (a caption hash for shards)."""
        from aligntok.data.images import stable_hash

        indices = batch["index"].tolist() if "index" in batch else [-1] * len(captions)
        keys = [i if i >= 0 else stable_hash(c) for i, c in zip(indices, captions, strict=True)]
        dropped = caption_dropped(self.seed, step, keys, self.caption_dropout)
        return ["" if d else c for c, d in zip(captions, dropped, strict=True)]

    def losses(self, batch: dict, step: int) -> dict[str, tuple[torch.Tensor, dict]]:
        z, captions = self.latents_and_captions(batch)
        text, mask, pooled = self.text(self.dropped(batch, captions, step))
        t = shift_time(self.transport.sample_time(z.shape[0], z.device), self.shift)
        loss, logs = self.transport.loss(self.model, z, {"text": text, "text_mask": mask, "pooled": pooled}, t=t)
        return {"model": (loss, {k: v for k, v in logs.items() if k != "loss"})}


def ensure_tokenizer(data: T2IDataConfig) -> Path:
    """``data.tokenizer``, trained first from ``data.build_tokenizer`` when it does not exist yet."""
    from aligntok.config import load_config
    from aligntok.training.stages import TokenizerTrainConfig, train_tokenizer

    path = Path(data.tokenizer)
    if (path / "config.json").is_file() or not data.build_tokenizer:
        return path
    if not path.name.startswith("stage"):
        raise ConfigError(f"data.build_tokenizer needs data.tokenizer to be RUN/stageN, got {path}")
    cfg = load_config(TokenizerTrainConfig, data.build_tokenizer)
    log.info("training tokenizer %s into %s (first run only)", data.build_tokenizer, path.parent)
    outputs = train_tokenizer(cfg, path.parent)
    if path not in outputs.values():
        raise ConfigError(f"{data.build_tokenizer} does not produce {path} (it produced {sorted(map(str, outputs.values()))})")
    return path


def latent_statistics(tokenizer, dataset, count: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the tokenizer's latents: its recorded ones, else those of the first
    ``count`` images (plain and flipped, as cache-latents measures)."""
    if tokenizer.config.latent_mean is not None and tokenizer.config.latent_std is not None:
        return list(tokenizer.config.latent_mean), list(tokenizer.config.latent_std)
    import itertools

    from aligntok.data import collate_samples
    from aligntok.data.latent_dataset import ChannelMoments
    from aligntok.data.shards import ShardDataset

    if isinstance(dataset, ShardDataset):  # streamed: the first images of one reader over every shard
        samples = itertools.islice(dataset.reader_stream(0, 1, 0), count)
    else:
        samples = (dataset[i] for i in range(min(count, len(dataset))))
    moments = ChannelMoments.empty(tokenizer.latent_channels)
    while chunk := list(itertools.islice(samples, 64)):
        images = collate_samples(chunk)["image"].to(device)
        with torch.no_grad():
            for x in (images, images.flip(-1)):
                moments = moments.merge(ChannelMoments.of(tokenizer.encode(x).cpu()))
    return moments.mean.tolist(), moments.std.tolist()


def _caption_cache(data: T2IDataConfig, tokenizer):
    """The latent cache of ``data.cache``, checked to hold captions and ``tokenizer``'s latents."""
    from aligntok.data.latent_dataset import LatentDataset

    dataset = LatentDataset(data.cache)
    if not dataset.has_captions:
        raise ConfigError(f"latent cache {data.cache} has no captions: make it with cache-latents --captions")
    channels, height, width = dataset.latent_shape
    if channels != tokenizer.latent_channels or height * tokenizer.stride != data.resolution:
        raise ConfigError(f"latent cache {data.cache} ({channels}x{height}x{width}) does not fit data.tokenizer "
                          f"({tokenizer.latent_channels} channels) at data.resolution={data.resolution}")
    return dataset


def _validating_trainer(cfg: T2ITrainConfig, task: T2ITask, stats: tuple[list[float], list[float]], **kwargs):
    """The engine, rendering ``cfg.validation`` grids after the checkpoints it asks for."""
    from aligntok.diffusion.samplers import SamplerConfig
    from aligntok.diffusion.t2i_sampling import (
        T2IGenerator,
        T2ISampleConfig,
        render_grid,
    )
    from aligntok.training.trainer import Trainer

    val = cfg.validation

    class ValidatingTrainer(Trainer):
        def save_checkpoint(self) -> Path:
            path = super().save_checkpoint()
            if val.every and val.prompts and (self.step % val.every == 0 or self.step == self.train.steps):
                self.render_validation()
            return path

        def render_validation(self) -> None:
            state = self.ema_state_dict("model") if "model" in self.emas else self.model_state_dict("model")  # collective
            if self.dist.is_main:
                # Forked RNG and a meta-device build: rendering draws nothing from the training's random streams.
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    with torch.device("meta"):
                        model = T2ITransformer(task.model.config, initialize=False)
                    model.load_state_dict(state, assign=True)
                    generator = T2IGenerator(model.to(self.device).eval(), task.tokenizer, task.text, *stats,
                                             resolution=cfg.data.resolution)
                    sampler = SamplerConfig(num_steps=val.steps, cfg_scale=val.cfg_scale, cfg_interval_start=0.0,
                                            timestep_shift=task.shift)
                    render_grid(generator, val.prompts, self.out_dir / "validation" / f"step-{self.step:07d}.png",
                                T2ISampleConfig(seed=val.seed, sampler=sampler))
            self.dist.barrier()

    return ValidatingTrainer(task, **kwargs)


def train_t2i(cfg: T2ITrainConfig, run_dir: str | Path) -> Path:
    """Train (or resume) a T2I transformer in ``run_dir/train`` and export it to ``run_dir/model``."""
    from aligntok.data import build_dataset, build_loader
    from aligntok.models.tokenizer import LatentTokenizer
    from aligntok.training.distributed import init_distributed
    run_dir = Path(run_dir)
    dist = init_distributed()
    ensure_tokenizer(cfg.data)  # every rank: tokenizer training is itself a (torchrun-aware) engine run
    tokenizer = LatentTokenizer.from_pretrained(cfg.data.tokenizer, map_location=dist.device)
    if cfg.data.resolution % tokenizer.stride:
        raise ConfigError(f"data.resolution={cfg.data.resolution} is not a multiple of the tokenizer stride {tokenizer.stride}")
    if cfg.token_pixels % tokenizer.stride:
        raise ConfigError(f"tokenizer stride {tokenizer.stride} does not divide token_pixels={cfg.token_pixels} "
                          "(packing makes tokens of token_pixels px)")
    pack = cfg.token_pixels // tokenizer.stride
    if cfg.data.resolution % cfg.token_pixels:
        raise ConfigError(f"data.resolution={cfg.data.resolution} is not a multiple of token_pixels={cfg.token_pixels}")
    text = TextConditioner(cfg.text).to(dist.device)
    if cfg.data.cache:
        dataset = stats_set = _caption_cache(cfg.data, tokenizer)
        mean, std = dataset.latent_mean.tolist(), dataset.latent_std.tolist()
    else:
        dataset = build_dataset(cfg.data.train, cfg.data.resolution, hflip=cfg.data.hflip, seed=cfg.train.seed,
                                builtin_size=cfg.data.builtin_size)
        stats_set = build_dataset(cfg.data.train, cfg.data.resolution, seed=cfg.train.seed,
                                  builtin_size=cfg.data.builtin_size)
        mean, std = latent_statistics(tokenizer, stats_set, cfg.data.stats_samples, dist.device)
    mean_t = torch.tensor(mean, device=dist.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=dist.device).view(1, -1, 1, 1)

    def normalize(z: torch.Tensor) -> torch.Tensor:
        return (z - mean_t) / std_t

    model_cfg = cfg.model_config(in_channels=tokenizer.latent_channels, pack=pack, text_dim=text.text_dim,
                                 pooled_dim=text.pooled_dim)
    side = cfg.data.resolution // tokenizer.stride
    shift = cfg.time_shift((side // pack) ** 2)
    torch.manual_seed(cfg.train.seed)  # the initial weights (rank 0's are broadcast by the engine)
    model = T2ITransformer(model_cfg)
    if cfg.init_from:  # a resumed run's checkpoint replaces these weights in fit()
        start = T2ITransformer.from_pretrained(cfg.init_from)
        if dataclasses.replace(start.config, gradient_checkpointing=False, mask_padding=False) != dataclasses.replace(
                model_cfg, gradient_checkpointing=False, mask_padding=False):
            raise ConfigError(f"init_from={cfg.init_from} has another architecture: {start.config} vs {model_cfg}")
        model.load_state_dict(start.state_dict())
    task = T2ITask(model, Transport(cfg.transport), tokenizer, text, normalize,
                   caption_dropout=cfg.text.caption_dropout, seed=cfg.train.seed, shift=shift,
                   hflip=cfg.data.hflip and bool(cfg.data.cache))
    per_rank = cfg.train.batch_size // dist.world_size

    def loader_factory(start_step: int):
        return build_loader(dataset, per_rank, rank=dist.rank, world_size=dist.world_size, seed=cfg.train.seed,
                            num_workers=cfg.data.num_workers, start_step=start_step)

    if cfg.data.buckets:  # sides in 16-px multiples: the token size of every tokenizer after packing
        from aligntok.data.buckets import bucketed_loader_factory

        loader_factory = bucketed_loader_factory(
            stats_set, cfg.data.train, cfg.data.resolution, cfg.data.buckets, cfg.token_pixels, per_rank, rank=dist.rank,
            world_size=dist.world_size, seed=cfg.train.seed, hflip=cfg.data.hflip, num_workers=cfg.data.num_workers)

    started = time.perf_counter()
    trainer = _validating_trainer(cfg, task, (mean, std), train=cfg.train, optim={"model": cfg.optim},
                                  loader_factory=loader_factory, out_dir=run_dir / "train", run_config=cfg, dist=dist)
    result = trainer.fit()
    state = trainer.ema_state_dict("model") if "model" in trainer.emas else trainer.model_state_dict("model")
    out = run_dir / "model"
    if dist.is_main:
        export = T2ITransformer(model_cfg, initialize=False)
        export.load_state_dict(state)
        extra: dict[str, Any] = {
            "latent_mean": mean, "latent_std": std, "tokenizer": str(cfg.data.tokenizer),
            "tokenizer_stride": tokenizer.stride, "text": text.describe(), "resolution": cfg.data.resolution,
            "train_shift": shift, "steps": result.step, "preset": cfg.preset, "buckets": list(cfg.data.buckets),
        }
        export.save_pretrained(out, extra=extra)
        log.info("T2I: %d steps in %.1f s -> %s", result.step, time.perf_counter() - started, out)
    dist.barrier()
    return out
