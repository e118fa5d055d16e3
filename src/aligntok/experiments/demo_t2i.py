"""``aligntok demo-t2i``: text-to-image on AlignTok latents in miniature, offline, on a CPU.

A tiny AlignTok tokenizer (``aligntok demo``'s when ``tokenizer`` names one that exists, else trained here
with the demo's preset) whose decoder is fine-tuned on ``builtin:scenes`` (AlignTok's stage 3 run again:
the latents stay the demo tokenizer's), the stand-in T5, FLUX-tiny trained on ``builtin:scenes``, then: samples for
fixed prompts, the miniature GenEval (:mod:`aligntok.eval.geneval_scenes`) judged by the stand-in detector
(:mod:`aligntok.standins.judge`) with its ceiling on real renders and the tokenizer's ceiling on their
reconstructions, and the scene CLIP's score (:mod:`aligntok.standins.scene_clip`). Writes ``report.html``,
``metrics.json`` (``geneval_overall``, ``geneval_tasks``, ``judge_ceiling``, ``tokenizer_ceiling``,
``clip_score``, ``wall_seconds``), GenEval's folder layout (``geneval/``) and its ``results.jsonl``.
Every trained piece is kept in the output folder, so re-running resumes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from aligntok.config import load_config
from aligntok.diffusion.t2i_training import T2ITrainConfig
from aligntok.standins.judge import JudgeConfig
from aligntok.standins.scene_clip import SceneCLIPConfig

PRESETS = ("demo", "minimal")


@dataclasses.dataclass
class DecoderFinetuneConfig:
    """AlignTok's stage 3 (decoder-only refinement: the latents stay as they are) run on the T2I images, on top
    of the reused tokenizer, so its decoder fits them. Runs in OUT/tokenizer-finetune; steps 0 = no fine-tune."""

    data: str = "builtin:scenes"
    steps: int = 300
    batch_size: int = 16
    lr: float = 1.0e-3  #: cosine to 5% (the demo's stage 3)

    def validate(self) -> None:
        from aligntok.config import ConfigError

        if self.steps < 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ConfigError("decoder_finetune needs steps >= 0, batch_size > 0 and lr > 0")


@dataclasses.dataclass
class DemoT2IConfig:
    """What `aligntok demo-t2i` runs (presets: aligntok/experiments/presets/t2i_*.yaml)."""

    tokenizer: str = "aligntok-demo/tokenizer/stage3"  #: reused when it exists; else trained with tokenizer_preset
    tokenizer_preset: str = "demo"  #: the `aligntok demo` preset whose tokenizer is trained when none is found
    #: the images that tokenizer trains on; null = the preset's own, which gives `aligntok demo`'s very tokenizer
    tokenizer_data: str | None = None
    decoder_finetune: DecoderFinetuneConfig = dataclasses.field(default_factory=DecoderFinetuneConfig)
    t2i: T2ITrainConfig = dataclasses.field(default_factory=T2ITrainConfig)
    judge: JudgeConfig = dataclasses.field(default_factory=JudgeConfig)
    clip: SceneCLIPConfig = dataclasses.field(default_factory=SceneCLIPConfig)
    prompts: list[str] = dataclasses.field(default_factory=list)  #: shown with their images in the report
    images_per_prompt: int = 4
    geneval_per_task: int = 10  #: GenEval's n (prompts drawn per task; single_object has one per kind)
    geneval_seed: int = 43  #: GenEval's prompt seed
    sample_steps: int = 20
    cfg_scale: float = 4.0
    seed: int = 0


def preset_path(name: str) -> Path:
    """The embedded demo-t2i preset ``name`` (presets/t2i_NAME.yaml)."""
    return Path(str(resources.files("aligntok.experiments") / "presets" / f"t2i_{name}.yaml"))


def _tokenizer(cfg: DemoT2IConfig, out: Path, timings: dict[str, float]) -> Path:
    """The tokenizer the T2I model trains on: the demo's (reused when it exists, else trained into OUT/tokenizer
    with the demo's preset) with its decoder fine-tuned on the T2I images (``cfg.decoder_finetune``).

    Trained here with a fine-tune to follow, the preset's own stage 3 is skipped: the fine-tune is that stage.
    """
    from aligntok.experiments.demo import load_experiment_config
    from aligntok.experiments.pipeline import Progress, ensure_standins
    from aligntok.training.stages import train_tokenizer

    finetune = cfg.decoder_finetune
    presets = ["demo"] if cfg.tokenizer_preset == "demo" else ["demo", cfg.tokenizer_preset]
    experiment = load_experiment_config(presets)
    tok_cfg = experiment.tokenizer
    base = Path(cfg.tokenizer)
    if not (base / "config.json").is_file():
        timings.update(ensure_standins(experiment, Progress("demo-t2i", enabled=False)))
        started = time.perf_counter()
        trained = tok_cfg if cfg.tokenizer_data is None else dataclasses.replace(
            tok_cfg, data=dataclasses.replace(tok_cfg.data, train=cfg.tokenizer_data))
        outputs = train_tokenizer(trained, out / "tokenizer", (1, 2) if finetune.steps else None)
        timings["tokenizer (demo preset)"] = round(time.perf_counter() - started, 1)
        base = outputs[max(outputs)]
    if not finetune.steps:
        return base
    stage = tok_cfg.stage3
    stage = dataclasses.replace(  # start_from gives the stage a fresh discriminator itself
        stage,
        train=dataclasses.replace(stage.train, steps=finetune.steps, batch_size=finetune.batch_size,
                                  ckpt_every=max(finetune.steps, 1)),
        optim=dataclasses.replace(stage.optim, lr=finetune.lr))
    data = dataclasses.replace(tok_cfg.data, train=finetune.data, resolution=cfg.t2i.data.resolution, num_workers=0)
    started = time.perf_counter()
    outputs = train_tokenizer(dataclasses.replace(tok_cfg, stage3=stage, data=data), out / "tokenizer-finetune", (3,),
                              start_from=base)
    timings["tokenizer decoder fine-tune"] = round(time.perf_counter() - started, 1)
    return outputs[3]


def generate(generator, prompts: list[str], n: int, *, steps: int, cfg_scale: float, seed: int,
             batch_size: int = 32) -> np.ndarray:
    """n images per prompt, uint8 (len(prompts) * n, H, W, 3), prompt k's consecutive; image k * n + j is
    seeded as prompt index k * n + j (FLUX's resolution shift, guidance on every step)."""
    from aligntok.diffusion.samplers import SamplerConfig
    from aligntok.diffusion.t2i_sampling import T2ISampleConfig

    config = T2ISampleConfig(seed=seed, sampler=SamplerConfig(num_steps=steps, cfg_scale=cfg_scale,
                                                               cfg_interval_start=0.0, timestep_shift=0.0))
    flat = [p for p in prompts for _ in range(n)]
    batches = [generator.generate(flat[i : i + batch_size], range(i, min(i + batch_size, len(flat))), config)
               for i in range(0, len(flat), batch_size)]
    return np.concatenate(batches)


def ensure_judge(config: JudgeConfig, directory: Path, timings: dict[str, float]):
    """The stand-in judge saved in ``directory``, trained there first (timed) when it is missing."""
    from aligntok.standins.judge import CONFIG_FILE, SceneJudge

    if not (directory / CONFIG_FILE).is_file():
        started = time.perf_counter()
        SceneJudge.train(config).save(directory)
        timings["stand-in judge training"] = round(time.perf_counter() - started, 1)
    return SceneJudge.load(directory)


def ensure_scene_clip(config: SceneCLIPConfig, directory: Path, timings: dict[str, float]) -> Path:
    """The scene CLIP's directory, trained there first (timed) when it is missing."""
    from aligntok.standins.scene_clip import train_scene_clip

    if not (directory / "config.json").is_file():
        started = time.perf_counter()
        train_scene_clip(directory, config)
        timings["scene CLIP training"] = round(time.perf_counter() - started, 1)
    return directory


def mean_clip_score(scorer, images: np.ndarray, prompts: list[str]) -> float:
    """CLIP score (:func:`aligntok.eval.t2i.clip_score`) averaged over (image, prompt) pairs."""
    from aligntok.eval.t2i import clip_score

    return float(clip_score(*scorer.embed(images, prompts)).mean())


def run_demo_t2i(out_dir: str | Path, *, preset: str = "demo", overrides: list[str] = ()) -> Path:
    """Run the T2I demo into ``out_dir``; returns the path of its report.html."""
    from aligntok.diffusion.t2i_sampling import T2IGenerator
    from aligntok.diffusion.t2i_training import train_t2i
    from aligntok.eval.geneval import write_geneval_folder
    from aligntok.eval.geneval_scenes import (
        create_prompts,
        miniature_geneval,
        prompt_renders,
        reconstruct,
        score_images,
    )
    from aligntok.eval.t2i import CLIPScorer
    from aligntok.experiments.pipeline import claim_folder, write_json
    from aligntok.standins.scene_clip import retrieval_accuracy

    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    started = time.perf_counter()
    files = [preset_path("demo")] + ([preset_path(preset)] if preset != "demo" else [])
    cfg = load_config(DemoT2IConfig, files, list(overrides))
    out = Path(out_dir)
    claim_folder(out, "demo-t2i", cfg)  # a folder of another config's (or anything's) results is refused
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        begin = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - begin, 1)
        return value

    tokenizer_dir = _tokenizer(cfg, out, timings)
    t2i_cfg = dataclasses.replace(cfg.t2i, data=dataclasses.replace(cfg.t2i.data, tokenizer=str(tokenizer_dir),
                                                                    build_tokenizer=None))
    model_dir = timed("FLUX-tiny training", train_t2i, t2i_cfg, out / "t2i")
    judge = ensure_judge(cfg.judge, out / "judge", timings)
    clip_dir = ensure_scene_clip(cfg.clip, out / "clip", timings)

    generator = T2IGenerator.load(model_dir, tokenizer_dir)
    metadata = create_prompts(seed=cfg.geneval_seed, n=cfg.geneval_per_task)
    n = cfg.images_per_prompt
    sampling = {"steps": cfg.sample_steps, "cfg_scale": cfg.cfg_scale, "seed": cfg.seed}
    samples = timed("sampling (GenEval prompts)", generate, generator, [m["prompt"] for m in metadata], n, **sampling)
    write_geneval_folder(out / "geneval", metadata, samples)
    shown = timed("sampling (showcase prompts)", generate, generator, cfg.prompts, n, **sampling) if cfg.prompts else None

    resolution = samples.shape[1]
    real = prompt_renders(metadata, seed=cfg.seed, resolution=resolution, samples_per_prompt=n)
    generated = miniature_geneval(judge.detect, samples, metadata)
    judge_ceiling = miniature_geneval(judge.detect, real, metadata)
    tokenizer_ceiling = miniature_geneval(judge.detect, reconstruct(generator.tokenizer, real), metadata)
    rows = score_images(judge.detect(samples), [m for m in metadata for _ in range(n)],
                        [f"{k:05d}/samples/{j:04d}.png" for k in range(len(metadata)) for j in range(n)])
    (out / "geneval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    clip_score = mean_clip_score(CLIPScorer(clip_dir), samples, [m["prompt"] for m in metadata for _ in range(n)])
    metrics: dict[str, Any] = {
        "geneval_overall": generated["overall"],
        "geneval_tasks": {tag: t["score"] for tag, t in generated["tasks"].items()},
        "judge_ceiling": judge_ceiling["overall"],
        "tokenizer_ceiling": tokenizer_ceiling["overall"],
        "clip_score": clip_score,
        "clip_retrieval_accuracy": retrieval_accuracy(clip_dir),
        "num_prompts": len(metadata), "images_per_prompt": n, "tokenizer": str(tokenizer_dir),
        "timings_seconds": timings,
    }
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(out / "metrics.json", metrics)
    return _write_report(out, metrics, generated, judge_ceiling, tokenizer_ceiling, cfg, shown)


def _write_report(out: Path, metrics: dict[str, Any], generated: dict, judge_ceiling: dict, tokenizer_ceiling: dict,
                  cfg: DemoT2IConfig, shown: np.ndarray | None) -> Path:
    from aligntok.eval.report import Section, image_grid, png_bytes, write_report

    table = [{"task": tag, "generated": t["score"], "tokenizer ceiling": tokenizer_ceiling["tasks"][tag]["score"],
              "judge ceiling": judge_ceiling["tasks"][tag]["score"], "images": t["total"]}
             for tag, t in generated["tasks"].items()]
    table.append({"task": "overall", "generated": generated["overall"], "tokenizer ceiling": tokenizer_ceiling["overall"],
                  "judge ceiling": judge_ceiling["overall"], "images": generated["num_images"]})
    figures = []
    if shown is not None:
        n = cfg.images_per_prompt
        figures = [(png_bytes(image_grid(shown[k * n : (k + 1) * n], columns=n), scale=2), prompt)
                   for k, prompt in enumerate(cfg.prompts)]
    sections = [
        Section("Prompts and their images", "Each prompt with its images (seeds 0..n-1 of the prompt).", figures=figures),
        Section("Miniature GenEval", "GenEval's six tasks and scoring rules, judged by a stand-in detector trained on "
                "renders. Judge ceiling: real renders of scenes made for each prompt; tokenizer ceiling: the "
                "tokenizer's reconstructions of them (a generator on this tokenizer cannot beat it).", table=table),
        Section("Other metrics", table=[{"metric": k, "value": metrics[k]} for k in
                                        ("clip_score", "clip_retrieval_accuracy", "wall_seconds")]),
        Section("Where the time went", table=[{"step": k, "seconds": v} for k, v in metrics["timings_seconds"].items()]),
    ]
    intro = ("<p>FLUX-tiny trained on a tiny AlignTok tokenizer's latents of <code>builtin:scenes</code>, with the "
             "stand-in T5. Numbers from this miniature show the machinery, not the paper's.</p>")
    return write_report(out / "report.html", title="aligntok demo-t2i", intro=intro, sections=sections)
