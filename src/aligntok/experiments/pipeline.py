"""One experiment on the built-in data: tokenizer -> latent cache -> LightningDiT -> samples -> metrics.

``aligntok demo`` runs one experiment; ``aligntok reproduce`` runs many (methods x seeds x ablations)
under one protocol. Everything lands in the experiment's folder::

    tokenizer/stageN     the trained tokenizer after each stage (tokenizer/train: logs, checkpoints)
    latents/             the latent cache the DiT trains on
    dit/model, dit/train the LightningDiT and its logs and checkpoints
    results/*.json       one file per measurement

Every step is skipped when its output exists, so re-running an interrupted experiment continues where
it stopped. The protocol: reconstruction metrics and the linear probe's test set use ``num_heldout``
builtin:shapes images drawn with ``heldout_seed`` (training images use the stage seed); generated
samples are class-balanced and compared with the same held-out images by the evaluation network
(:mod:`aligntok.standins`, which plays Inception's role: "gFD" and "rFD" are Fréchet distances in its
features, not Inception FIDs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.config import ConfigError, config_to_dict, load_config, save_config
from aligntok.diffusion.samplers import SamplerConfig
from aligntok.diffusion.training import DiTTrainConfig
from aligntok.io import write_text_atomically
from aligntok.training.stages import TokenizerTrainConfig, stage_output_dir

__all__ = [
    "EvaluationConfig",
    "ExperimentConfig",
    "Progress",
    "Experiment",
    "ensure_standins",
    "heldout_set",
]


@dataclasses.dataclass
class EvaluationConfig:
    """The measurement protocol, shared by every experiment of a comparison."""

    eval_network: str = "shapes"  #: stand-in Inception: an aligntok.standins.EVAL_NETWORKS name
    heldout_seed: int = 777  #: builtin:shapes seed of the held-out images (never a training seed)
    num_heldout: int = 500  #: held-out images: reconstruction metrics, FD reference set, probe test set
    num_probe_train: int = 1000  #: training images whose pooled latents fit the linear probe
    num_samples: int = 500  #: generated images per gFD (class-balanced)
    sampler: SamplerConfig = dataclasses.field(
        default_factory=lambda: SamplerConfig(num_steps=30, cfg_scale=4.0)
    )  #: sampling for gFD with guidance (the paper's ablations: Euler, 30 steps); cfg_scale=1 gives "without"
    sample_seed: int = 0  #: sample i's noise comes from (sample_seed, i)
    batch_size: int = 100  #: images per model call when encoding, decoding and sampling

    def validate(self) -> None:
        if min(self.num_heldout, self.num_probe_train, self.num_samples, self.batch_size) < 1:
            raise ConfigError("num_heldout, num_probe_train, num_samples and batch_size must be >= 1")


@dataclasses.dataclass
class ExperimentConfig:
    """A tokenizer, a DiT on its latents, and how both are measured."""

    tokenizer: TokenizerTrainConfig = dataclasses.field(default_factory=TokenizerTrainConfig)
    #: the DiT; its data.cache is the experiment's latent cache (set by the experiment, any value here is replaced)
    dit: DiTTrainConfig = dataclasses.field(
        default_factory=lambda: DiTTrainConfig(data=dataclasses.replace(DiTTrainConfig().data, cache="latents"))
    )
    num_latents: int = 2000  #: builtin:shapes images (plain and flipped) encoded for DiT training
    eval: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)

    def validate(self) -> None:
        from aligntok.data.builtin import shapes_difficulty

        if shapes_difficulty(self.tokenizer.data.train) is None:
            raise ConfigError("experiments run on builtin:shapes or builtin:shapes-NAME (an evaluation network and "
                              f"held-out split exist for those), not {self.tokenizer.data.train!r}")

    @property
    def difficulty(self) -> str:
        """The builtin:shapes difficulty preset of the tokenizer's data (held-out and probe sets use it too)."""
        from aligntok.data.builtin import shapes_difficulty

        return shapes_difficulty(self.tokenizer.data.train) or "standard"
        if self.num_latents < 1:
            raise ConfigError("num_latents must be >= 1")


class Progress:
    """One line per pipeline step on stderr, with the wall time since the run started."""

    def __init__(self, label: str, *, enabled: bool = True) -> None:
        self.label, self.enabled, self.started = label, enabled, time.perf_counter()
        self.prefix = ""
        self.bars = enabled  #: whether nested steps draw their own progress bars

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def say(self, message: str) -> None:
        if self.enabled:
            minutes, seconds = divmod(int(self.elapsed()), 60)
            print(f"[{self.label} {minutes:d}:{seconds:02d}] {self.prefix}{message}", file=sys.stderr, flush=True)

    def child(self, name: str) -> Progress:
        """The same clock and switch, lines prefixed with ``name``, no nested bars (many runs in a row)."""
        child = Progress(self.label, enabled=self.enabled)
        child.started, child.prefix, child.bars = self.started, f"{name}: ", False
        return child


def claim_folder(directory: Path, kind: str, cfg: Any) -> bool:
    """Record ``cfg`` in ``directory/KIND.yaml``; refuse (ConfigError) a folder holding another config's
    results, or files of anything else (no KIND.yaml): they would be read back as this run's. Returns whether
    an earlier run had claimed it (this one resumes)."""
    record = directory / f"{kind}.yaml"
    if record.is_file():
        if config_to_dict(load_config(type(cfg), record)) != config_to_dict(cfg):
            raise ConfigError(f"{directory} holds results of another {kind} config ({record}); "
                              "use a new output folder, or delete that one")
        return True
    if directory.is_dir() and any(directory.iterdir()):
        raise ConfigError(f"{directory} already holds files but no {record.name}, so they are not this {kind}'s "
                          "results; use a new or empty output folder")
    directory.mkdir(parents=True, exist_ok=True)
    save_config(cfg, record)
    return False


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Within the block torch uses ``threads`` CPU threads (0: its own setting); ValueError below 0. More
    threads than free cores only add contention (OpenMP barriers), so the demos and reproductions take it."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def duration_text(results: dict[str, Any]) -> str:
    """``results``' wall time for a report; a resumed run's ``seconds`` count only the last invocation."""
    minutes = f"{results['seconds'] / 60:.1f} min"
    if results.get("resumed"):
        return f"{minutes} in the invocation that finished it, resumed from earlier ones not counted"
    return minutes


def heldout_set(cfg: EvaluationConfig, resolution: int, difficulty: str = "standard"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out builtin:shapes images (uint8 NCHW) and labels every experiment is measured on."""
    from aligntok.data.builtin import render_shapes

    return render_shapes(cfg.num_heldout, resolution, seed=cfg.heldout_seed, difficulty=difficulty)


def ensure_standins(cfg: ExperimentConfig, progress: Progress) -> dict[str, float]:
    """Find (shipped or cached) or train (first run of an unshipped recipe) the stand-in encoder, if the
    config names one, and the evaluation network; returns the seconds each took."""
    from aligntok.standins import (
        STANDIN_PREFIX,
        ensure_eval_network,
        resolve_encoder_spec,
    )

    seconds = {}
    encoder = cfg.tokenizer.model.encoder
    if encoder.startswith(STANDIN_PREFIX):
        progress.say(f"stand-in foundation encoder {encoder} (shipped, else trained on first use and cached)")
        started = time.perf_counter()
        resolve_encoder_spec(encoder, progress=progress.bars)
        seconds["stand-in encoder"] = round(time.perf_counter() - started, 1)
    progress.say(f"evaluation network {cfg.eval.eval_network} (shipped, else trained on first use and cached)")
    started = time.perf_counter()
    ensure_eval_network(cfg.eval.eval_network, progress=progress.bars)
    seconds["evaluation network"] = round(time.perf_counter() - started, 1)
    return seconds


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON, written atomically."""
    write_text_atomically(path, json.dumps(value, indent=2) + "\n")


def compute_once(path: Path, compute: Callable[[], Any]) -> Any:
    """``compute()``'s JSON result, computed once: read back from ``path`` on later calls."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    write_json(path, value)
    return value


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class Experiment:
    """One experiment in ``out_dir``; each method runs (or reads back) one step of the pipeline."""

    def __init__(self, cfg: ExperimentConfig, out_dir: str | os.PathLike, progress: Progress | None = None, *,
                 final_stage: int | None = None) -> None:
        self.cfg = cfg
        self.dir = Path(out_dir)
        #: the tokenizer stage whose latents the DiT learns (default: the method's last; ablations stop earlier)
        self.final_stage = final_stage or max(cfg.tokenizer.stages)
        self.progress = progress or Progress(self.dir.name, enabled=False)
        self.resolution = cfg.tokenizer.data.resolution
        self._heldout: tuple[torch.Tensor, torch.Tensor] | None = None
        self._eval_network = None

    # -- shared inputs -------------------------------------------------------------------------

    @property
    def heldout(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._heldout is None:
            self._heldout = heldout_set(self.cfg.eval, self.resolution, self.cfg.difficulty)
        return self._heldout

    def use_heldout(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Share an already rendered held-out set (experiments of one comparison use the same one)."""
        self._heldout = (images, labels)

    @property
    def eval_network(self):
        if self._eval_network is None:
            from aligntok.standins import ensure_eval_network, load_eval_network

            self._eval_network = load_eval_network(ensure_eval_network(self.cfg.eval.eval_network, progress=self.progress.bars))
        return self._eval_network

    def use_eval_network(self, network) -> None:
        self._eval_network = network

    # -- tokenizer -----------------------------------------------------------------------------

    def train_tokenizer(self, stages: tuple[int, ...] | None = None) -> dict[int, Path]:
        from aligntok.training.stages import train_tokenizer

        cfg = self.cfg.tokenizer
        self.claim_folder()
        self.progress.say(f"tokenizer ({cfg.method}, stages {', '.join(map(str, stages or tuple(cfg.stages)))})")
        return train_tokenizer(cfg, self.dir / "tokenizer", stages=stages)

    def claim_folder(self) -> None:
        """Record this experiment's config in its folder, or refuse a folder holding something else's results."""
        claim_folder(self.dir, "experiment", self.cfg)

    def tokenizer_dir(self, stage: int | None = None) -> Path:
        """The tokenizer after ``stage`` (default: the final stage)."""
        return stage_output_dir(self.dir / "tokenizer", stage or self.final_stage)

    def load_tokenizer(self, stage: int | None = None):
        from aligntok.models.tokenizer import LatentTokenizer

        return LatentTokenizer.from_pretrained(self.tokenizer_dir(stage)).eval()

    @torch.inference_mode()
    def encode(self, tokenizer, images: torch.Tensor) -> torch.Tensor:
        """Latents of uint8 images, in batches."""
        from aligntok.eval.images import from_uint8

        size = self.cfg.eval.batch_size
        return torch.cat([tokenizer.encode(from_uint8(images[part])) for part in _batches(len(images), size)])

    @torch.inference_mode()
    def reconstruct(self, tokenizer, images: torch.Tensor) -> torch.Tensor:
        """uint8 reconstructions of uint8 images."""
        from aligntok.eval.images import as_uint8, from_uint8

        size = self.cfg.eval.batch_size
        return torch.cat(
            [as_uint8(tokenizer.decode(tokenizer.encode(from_uint8(images[part])))) for part in _batches(len(images), size)]
        )

    def evaluate_tokenizer(self, stage: int | None = None) -> dict[str, Any]:
        """Reconstruction (PSNR, SSIM, perceptual distance, rFD) on the held-out images and the linear probe."""
        stage = stage or self.final_stage
        return compute_once(self.dir / "results" / f"tokenizer_stage{stage}.json", lambda: self._evaluate_tokenizer(stage))

    def _evaluate_tokenizer(self, stage: int) -> dict[str, Any]:
        from aligntok.eval.probe import average_pool, linear_probe
        from aligntok.eval.recon import ReconMetrics

        self.progress.say(f"evaluating the tokenizer after stage {stage}")
        started = time.perf_counter()
        tokenizer = self.load_tokenizer(stage)
        images, labels = self.heldout
        metrics = ReconMetrics(lpips=_PerceptualDistance(self.eval_network), inception=self.eval_network)
        reconstructions = self.reconstruct(tokenizer, images)
        metrics.update(images, reconstructions)
        recon = metrics.compute()
        # Does a reconstruction keep the class? The evaluation network on reconstructions vs on originals.
        from aligntok.standins import builtin_class_accuracy

        recon_class = builtin_class_accuracy(reconstructions, labels, network=self.eval_network)
        orig_class = builtin_class_accuracy(images, labels, network=self.eval_network)
        train_images, train_labels = probe_training_set(self.cfg, self.resolution)
        probe = linear_probe(
            average_pool(self.encode(tokenizer, train_images)), train_labels,
            average_pool(self.encode(tokenizer, images)), labels,
        )
        return {
            "psnr": recon["psnr"], "ssim": recon["ssim"], "perceptual": recon["lpips"], "rfd": recon["rfid"],
            "linear_probe": probe["accuracy"], "linear_probe_train": probe["train_accuracy"],
            "recon_class_accuracy": recon_class, "orig_class_accuracy": orig_class,
            "num_heldout": recon["num_images"], "num_probe_train": len(train_labels),
            "seconds": round(time.perf_counter() - started, 2),
        }

    # -- diffusion -----------------------------------------------------------------------------

    def train_dit(self) -> Path:
        """Cache the final tokenizer's latents and train the DiT on them; returns dit/model."""
        from aligntok.data.latents import cache_latents
        from aligntok.diffusion.training import train_dit

        model_dir = self.dir / "dit" / "model"
        if (model_dir / "config.json").is_file():
            return model_dir
        cache = self.dir / "latents"
        self.progress.say(f"caching latents of {self.cfg.num_latents} images (plain and flipped)")
        cache_latents(
            self.tokenizer_dir(), self.cfg.tokenizer.data.train, cache, resolution=self.resolution,
            batch_size=self.cfg.eval.batch_size, num_workers=0, builtin_size=self.cfg.num_latents,
            progress=self.progress.bars,
        )
        dit_cfg = dataclasses.replace(self.cfg.dit, data=dataclasses.replace(self.cfg.dit.data, cache=str(cache)))
        self.progress.say(f"training the LightningDiT ({dit_cfg.train.steps} steps)")
        return train_dit(dit_cfg, self.dir / "dit")

    def dit_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, checkpoint directory) of the DiT run's complete checkpoints, oldest first."""
        from aligntok.training.checkpoint import (
            complete_checkpoints,
            read_trainer_state,
        )

        return [(int(read_trainer_state(path)["step"]), path) for path in complete_checkpoints(self.dir / "dit" / "train")]

    def load_dit(self, checkpoint: Path | None = None):
        """The exported DiT, or the EMA weights of one training checkpoint."""
        from aligntok.models.lightningdit import LightningDiT, build_from_state_dict
        from aligntok.training.checkpoint import load_tensors

        if checkpoint is None:
            return LightningDiT.from_pretrained(self.dir / "dit" / "model").eval()
        config = self.cfg.dit.model_config()
        return build_from_state_dict(config, load_tensors(checkpoint / "ema_model.safetensors"), source=str(checkpoint)).eval()

    def generate(self, model, tokenizer, sampler: SamplerConfig, num: int | None = None) -> tuple[np.ndarray, torch.Tensor]:
        """Class-balanced samples (uint8 NHWC) and their labels."""
        from aligntok.diffusion.sampling import generate_images, sample_labels

        labels = sample_labels(num or self.cfg.eval.num_samples, model.num_classes)
        images = generate_images(model, tokenizer, labels, sampler, seed=self.cfg.eval.sample_seed,
                                 batch_size=self.cfg.eval.batch_size)
        return images, labels

    def evaluate_samples(self, name: str, sampler: SamplerConfig, checkpoint: Path | None = None,
                         keep: Callable[[np.ndarray, torch.Tensor], None] | None = None) -> dict[str, Any]:
        """gFD and class accuracy of samples drawn with ``sampler`` (results/gen_NAME.json).

        ``keep(images, labels)`` receives the samples when they are drawn (not when read back).
        """

        def compute() -> dict[str, Any]:
            from aligntok.standins import evaluate_builtin

            started = time.perf_counter()
            model, tokenizer = self.load_dit(checkpoint), self.load_tokenizer()
            images, labels = self.generate(model, tokenizer, sampler)
            if keep is not None:
                keep(images, labels)
            result = evaluate_builtin(images, labels, self.heldout[0], network=self.eval_network)
            return {
                "gfd": result["fd"], "class_accuracy": result["class_accuracy"], "num_samples": result["num_samples"],
                "sampler": dataclasses.asdict(sampler), "checkpoint": None if checkpoint is None else checkpoint.name,
                "seconds": round(time.perf_counter() - started, 2),
            }

        return compute_once(self.dir / "results" / f"gen_{name}.json", compute)


class _PerceptualDistance:
    """The built-in evaluation CNN's perceptual distance where :class:`ReconMetrics` takes LPIPS."""

    def __init__(self, network) -> None:
        self.network = network

    def __call__(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        from aligntok.standins import builtin_perceptual_distance

        return builtin_perceptual_distance(originals, reconstructions, network=self.network)


def probe_training_set(cfg: ExperimentConfig, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images (uint8) and labels the linear probe is fitted on: the first of the tokenizer's data."""
    from aligntok.data.builtin import render_shapes

    return render_shapes(cfg.eval.num_probe_train, resolution, seed=cfg.tokenizer.stage1.train.seed,
                         difficulty=cfg.difficulty)
