"""Sampling images from a trained T2I transformer: what ``aligntok sample-t2i`` runs.

Prompt ``i`` gets its own noise generator seeded from ``(seed, i)`` (:func:`.sampling.sample_generator`),
so a prompt's image does not depend on which other prompts share its batch, nor on the number of
processes. Prompts are cut into batches of ``batch_size`` consecutive indices and batch ``k`` runs on rank
``k % world_size``, so 1 and N processes compute the very same batches (bitwise-identical PNGs).

Guidance is real classifier-free guidance against the empty caption (the caption training dropped to),
through the class-to-image sampler (:func:`.samplers.sample`): a batch's prompts and the empty caption are
encoded together, and the sampler's "labels" index those rows (the null label is the empty caption's).
Time follows aligntok's convention; the grid shift defaults to FLUX's rule for the sampled token count.

Outputs: ``00000.png ...`` (one per prompt), ``grid.png`` and ``sampling.json`` (prompts and every setting);
or, given GenEval metadata, GenEval's own folder layout (:mod:`aligntok.eval.geneval`: ``<k:05d>/samples/
<j:04d>.png``, n images per prompt, sample j of prompt k seeded as prompt index ``k * n + j``) and ``sampling.json``.
Ranks hand their images to rank 0 through ``OUT/.parts`` (multi-node runs need a shared file system); an
interrupted run keeps its finished batches there and the same command makes only the missing ones
(:func:`.sampling.run_batches`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.diffusion.samplers import SamplerConfig, sample
from aligntok.diffusion.sampling import (
    GRID_FILE,
    PARTS_DIR,
    SETTINGS_FILE,
    _image_grid,
    run_batches,
    run_identity,
    sample_generator,
)
from aligntok.io import replace_atomically, write_text_atomically


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    replace_atomically(path, lambda staging: Image.fromarray(image).save(staging, format="PNG"))


@dataclasses.dataclass
class T2ISampleConfig:
    """Image size, seeds, batching and the sampler."""

    height: int | None = None  #: pixels; default: the model's training resolution
    width: int | None = None  #: pixels; default: the model's training resolution
    seed: int = 0  #: prompt i's noise comes from a generator seeded from (seed, i)
    batch_size: int = 16  #: prompts per model call (the same batches whatever the number of processes)
    grid_max: int = 64  #: the first this-many images go into grid.png
    sampler: SamplerConfig = dataclasses.field(
        default_factory=lambda: SamplerConfig(num_steps=30, cfg_scale=4.0, cfg_interval_start=0.0, timestep_shift=0.0)
    )  #: timestep_shift 0 = FLUX's rule for the token count (see transport.resolution_shift)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per non-empty line (a .txt file), or a JSON list / JSONL with a "prompt" or "caption" field."""
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith((".json", ".jsonl")):
        rows = json.loads(text) if str(path).endswith(".json") else [json.loads(line) for line in text.splitlines() if line.strip()]
        prompts = [r if isinstance(r, str) else r.get("prompt", r.get("caption")) for r in rows]
        if any(not isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: every entry needs a 'prompt' (or 'caption') string")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def text_config_of(info: dict[str, Any]):
    """The :class:`TextConfig` a T2I model directory's ``aligntok_t2i.json`` records: its encoder is the very
    directory trained with when that is still there (a stand-in's cache), else the recorded spec."""
    from aligntok.models.text import TextConfig

    fields = {f.name for f in dataclasses.fields(TextConfig)}
    config = TextConfig(**{k: v for k, v in info["text"].items() if k in fields})
    recorded = info["text"].get("encoder_path")
    if recorded and Path(recorded).is_dir():
        config.encoder = recorded
    return config


class T2IGenerator:
    """A T2I model with its tokenizer, text encoders and latent statistics: prompts -> uint8 NHWC images."""

    def __init__(self, model, tokenizer, text, mean: Sequence[float], std: Sequence[float], resolution: int) -> None:
        cfg = model.config
        if tokenizer.latent_channels != cfg.in_channels:
            raise ValueError(f"the tokenizer's {tokenizer.latent_channels}-channel latents do not fit the model "
                             f"({cfg.in_channels} channels)")
        self.model, self.tokenizer, self.text, self.resolution = model, tokenizer, text, resolution
        self.device = next(model.parameters()).device
        self.mean = torch.tensor(list(mean), device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), device=self.device).view(1, -1, 1, 1)

    @classmethod
    def load(cls, model_dir: str | os.PathLike, tokenizer: str | os.PathLike, device: torch.device | str = "cpu") -> T2IGenerator:
        """The model in ``model_dir`` (its text encoders and statistics as recorded there) and ``tokenizer``."""
        from aligntok.models.t2i import T2ITransformer, read_t2i_info
        from aligntok.models.text import TextConditioner
        from aligntok.models.tokenizer import LatentTokenizer

        info = read_t2i_info(model_dir)
        model = T2ITransformer.from_pretrained(model_dir, device=device).eval()
        tok = LatentTokenizer.from_pretrained(tokenizer, map_location=device).eval()
        if info.get("tokenizer_stride", tok.stride) != tok.stride:
            raise ValueError(f"{model_dir} was trained on stride-{info['tokenizer_stride']} latents; the tokenizer "
                             f"{tokenizer} has stride {tok.stride}")
        text = TextConditioner(text_config_of(info), progress=False).to(device)
        return cls(model, tok, text, info["latent_mean"], info["latent_std"], info["resolution"])

    def latent_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        stride, multiple = self.tokenizer.stride, self.tokenizer.stride * self.model.config.pack
        height = self.resolution if height is None else height  # 0 is an error, not the default
        width = self.resolution if width is None else width
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {multiple} px, got {height}x{width}")
        return height // stride, width // stride

    def shift_for(self, rows: int, cols: int, sampler: SamplerConfig) -> SamplerConfig:
        from aligntok.diffusion.transport import resolution_shift

        if sampler.timestep_shift > 0:
            return sampler
        pack = self.model.config.pack
        return dataclasses.replace(sampler, timestep_shift=resolution_shift((rows // pack) * (cols // pack)))

    def velocity_model(self, prompts: Sequence[str]):
        """``v(x, t, rows)``, a class-to-image velocity model whose "labels" index ``[*prompts, ""]``: row
        ``len(prompts)`` is the empty caption guidance runs against. Encoded in one batch (one padding length)."""
        text, mask, pooled = self.text([*prompts, ""])

        def velocity(x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return self.model(x, t, text[rows], mask[rows], pooled[rows])

        return velocity

    def generate(self, prompts: Sequence[str], indices: Sequence[int], config: T2ISampleConfig) -> np.ndarray:
        """Images of ``prompts`` (prompt j's noise from ``(config.seed, indices[j])``): uint8 (N, H, W, 3)."""
        from aligntok.eval.images import to_uint8_nhwc

        rows, cols = self.latent_size(config.height, config.width)
        sampler = self.shift_for(rows, cols, config.sampler)
        velocity = self.velocity_model(prompts)
        n = len(prompts)
        latents = sample(velocity, torch.arange(n, device=self.device), sampler,
                         latent_shape=(self.model.config.in_channels, rows, cols),
                         generator=[sample_generator(config.seed, i) for i in indices], null_label=n,
                         denormalize=lambda z: z * self.std + self.mean)
        with torch.inference_mode():
            return to_uint8_nhwc(self.tokenizer.decode(latents))


def render_grid(generator: T2IGenerator, prompts: Sequence[str], path: str | os.PathLike,
                config: T2ISampleConfig) -> Path:
    """All ``prompts`` (in batches of ``config.batch_size``) tiled into one PNG at ``path`` (validation grids)."""
    batches = [generator.generate(prompts[i : i + config.batch_size], range(i, min(i + config.batch_size, len(prompts))),
                                  config) for i in range(0, len(prompts), config.batch_size)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _save_png(Path(path), _image_grid(np.concatenate(batches)))
    return Path(path)


def _remove_stale_samples(out: Path, count: int, geneval: tuple[int, int] | None) -> None:
    """Remove the samples an earlier call left in ``out`` that this one will not overwrite (files and prompt
    folders named as this module names them), so that the folder, which GenEval and ``evaluate t2i`` read whole,
    holds this call's samples only. ``geneval``: (prompts, samples per prompt) of the GenEval layout."""
    from aligntok.eval.geneval import METADATA_FILE, SAMPLES_DIR

    if not out.is_dir():
        return
    for path in out.iterdir():
        if path.is_file() and path.suffix == ".png" and len(path.stem) == 5 and path.stem.isdigit():
            if geneval is not None or int(path.stem) >= count:
                path.unlink()
        elif path.is_dir() and len(path.name) == 5 and path.name.isdigit() and (path / METADATA_FILE).is_file():
            if geneval is None or int(path.name) >= geneval[0]:
                shutil.rmtree(path)
                continue
            for sample in (path / SAMPLES_DIR).glob("*.png"):
                if len(sample.stem) == 4 and sample.stem.isdigit() and int(sample.stem) >= geneval[1]:
                    sample.unlink()


def sample_t2i(model_dir: str | os.PathLike, tokenizer: str | os.PathLike, prompts: Sequence[str],
               out_dir: str | os.PathLike, config: T2ISampleConfig | None = None, *,
               geneval: Sequence[dict[str, Any]] | None = None, samples_per_prompt: int = 1) -> dict[str, Any]:
    """One image per prompt into ``out_dir`` (see the module doc); returns the settings written. torchrun-aware.

    ``geneval``: GenEval metadata entries (``prompts`` is then ignored: each entry's ``prompt`` is sampled
    ``samples_per_prompt`` times) written in GenEval's folder layout.
    """

    from aligntok import __version__
    from aligntok.training import distributed

    config = config or T2ISampleConfig()
    config.sampler.validate()
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt={samples_per_prompt} must be >= 1")
    if geneval is not None:
        prompts = [entry["prompt"] for entry in geneval for _ in range(samples_per_prompt)]
    if not prompts:
        raise ValueError("no prompts given")
    if config.batch_size < 1:
        raise ValueError(f"batch_size={config.batch_size} must be >= 1")
    dist = distributed.init_distributed()
    generator = T2IGenerator.load(model_dir, tokenizer, dist.device)
    out = Path(out_dir)
    parts = out / PARTS_DIR
    started = time.perf_counter()
    num_batches = math.ceil(len(prompts) / config.batch_size)

    def make_batch(batch: int) -> np.ndarray:
        indices = range(batch * config.batch_size, min((batch + 1) * config.batch_size, len(prompts)))
        return generator.generate([prompts[i] for i in indices], indices, config)

    identity = run_identity({"model": model_dir, "tokenizer": tokenizer},
                            {"config": dataclasses.asdict(config), "prompts": list(prompts)}, dist.device)
    images = run_batches(parts, identity, num_batches, make_batch, dist)
    rows, cols = generator.latent_size(config.height, config.width)
    settings = {
        "model": str(model_dir), "tokenizer": str(tokenizer), "prompts": list(prompts), "seed": config.seed,
        "seeding": "prompt i: torch.Generator (CPU) seeded from numpy SeedSequence([seed, i])",
        "height": rows * generator.tokenizer.stride, "width": cols * generator.tokenizer.stride,
        "batch_size": config.batch_size, "sampler": dataclasses.asdict(generator.shift_for(rows, cols, config.sampler)),
        "guidance": "classifier-free against the empty caption", "world_size": dist.world_size,
        "device": str(dist.device), "aligntok_version": __version__,
    }
    if images is not None:  # rank 0; every file atomic, so a kill leaves whole files and the parts to resume
        _remove_stale_samples(out, len(images), (len(geneval), samples_per_prompt) if geneval is not None else None)
        if geneval is not None:
            from aligntok.eval.geneval import write_geneval_folder

            write_geneval_folder(out, geneval, images)
            settings["geneval"] = {"prompts": len(geneval), "samples_per_prompt": samples_per_prompt,
                                   "layout": "<k:05d>/metadata.jsonl, <k:05d>/samples/<j:04d>.png, <k:05d>/grid.png"}
        else:
            for i, image in enumerate(images):
                _save_png(out / f"{i:05d}.png", image)
            _save_png(out / GRID_FILE, _image_grid(images[: config.grid_max]))
        settings["seconds"] = round(time.perf_counter() - started, 3)
        write_text_atomically(out / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
        shutil.rmtree(parts, ignore_errors=True)
    dist.barrier()
    return settings
