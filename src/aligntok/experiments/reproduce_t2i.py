"""``aligntok reproduce --preset t2i-minimal|t2i-quick|t2i-full``: the paper's text-to-image claim in miniature.

The paper: under the same training steps, a FLUX-architecture model on AlignTok latents beats one on FLUX VAE
latents (gFID on COCO captions with and without guidance, GenEval, CLIP score). Here, on ``builtin:scenes``:
for every seed, AlignTok (three stages), the FLUX-VAE-shaped KL-VAE (diffusers ``AutoencoderKL``, f8 c16,
trained from scratch) and the plain VAE, each trained for the same number of tokenizer steps
(:func:`~aligntok.experiments.reproduce.tokenizer_for_method`), then the same FLUX-tiny transformer with the
same stand-in T5 and steps on each tokenizer's latents (both f8 tokenizers are packed 2x2: the same tokens).
At every T2I checkpoint (EMA weights):

* the miniature GenEval (:mod:`aligntok.eval.geneval_scenes`), per task and overall, with guidance, judged by
  the stand-in detector (:mod:`aligntok.standins.judge`);
* gFD on held-out captions: one sample per caption of ``num_heldout`` builtin:scenes scene graphs drawn with
  ``heldout_seed``, against those scenes' renders, in the evaluation network's pooled features, with and
  without guidance (the COCO-caption FID's protocol in miniature; an evaluation CNN, not Inception);
* the scene CLIP's score (:mod:`aligntok.standins.scene_clip`) of the GenEval samples.

Ceilings: the judge on real renders of the GenEval prompts (``judge_ceiling``), on each tokenizer's
reconstructions of them (its ``tokenizer_ceiling``: a generator on it cannot beat it), and the scene CLIP's
retrieval accuracy and its score on real renders (``clip_ceiling``).

``results.json`` keys: ``preset``, ``command``, ``seconds`` (of the invocation that finished the run; ``resumed``
says whether earlier ones did part of it), ``methods``, ``seeds``, ``protocol``;
``judge_ceiling`` (``overall``, ``tasks``); ``clip_ceiling`` (``retrieval_accuracy``, ``clip_score_real``);
``table``: per method, each a ``{mean, std, n, values}`` over seeds (final checkpoint): ``geneval_overall``,
``geneval_tasks`` (task -> stats), ``gfd_guided``, ``gfd_unguided``, ``clip_score``, ``tokenizer_ceiling``,
``tokenizer_ceiling_tasks`` (task -> stats), ``psnr``, ``rfd`` (reconstructions of the held-out renders);
``curves``: per method and metric (``geneval_overall``, ``gfd_guided``, ``gfd_unguided``, ``clip_score``) a
list of ``{x: T2I step, mean, std, n, values}``; ``per_seed``: per method and seed, ``tokenizer`` and
``by_training_step`` (step -> that checkpoint's measurements); ``timings_seconds`` (the judge's and the scene
CLIP's training, when this call trained them). Everything lands under ``runs/METHOD/seedS``
and re-running resumes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from aligntok.config import (
    ConfigError,
    check_choice,
    config_to_dict,
    load_config,
)
from aligntok.diffusion.t2i_training import T2ITrainConfig
from aligntok.experiments.demo import preset_path
from aligntok.experiments.demo_t2i import (
    ensure_judge,
    ensure_scene_clip,
    generate,
    mean_clip_score,
)
from aligntok.experiments.demo_t2i import preset_path as t2i_preset_path
from aligntok.experiments.pipeline import (
    Progress,
    claim_folder,
    compute_once,
    write_json,
)
from aligntok.experiments.reproduce import (
    mean_std,
    seeded_tokenizer,
    tokenizer_for_method,
)
from aligntok.standins.judge import JudgeConfig
from aligntok.standins.scene_clip import SceneCLIPConfig
from aligntok.training.stages import METHOD_STAGES, TokenizerTrainConfig

__all__ = ["PRESETS", "T2IEvalConfig", "T2IReproduceConfig", "load_t2i_reproduce_config", "run_reproduce_t2i"]

#: ``--preset`` names: presets/reproduce_NAME.yaml over the demo's tokenizer and demo-t2i's T2I, judge and CLIP.
PRESETS = ("t2i-minimal", "t2i-quick", "t2i-full")
CURVE_METRICS = ("geneval_overall", "gfd_guided", "gfd_unguided", "clip_score")


@dataclasses.dataclass
class T2IEvalConfig:
    """The measurement protocol, shared by every tokenizer and seed."""

    eval_network: str = "shapes-easy"  #: the evaluation CNN whose pooled features gFD uses (aligntok.standins.EVAL_NETWORKS)
    heldout_seed: int = 777  #: builtin:scenes seed of the held-out captions and their renders (never a training seed)
    num_heldout: int = 200  #: held-out captions: one sample each, against their renders
    geneval_per_task: int = 10  #: GenEval's n (prompts per task; single_object has one per kind)
    geneval_seed: int = 43  #: GenEval's prompt seed
    images_per_prompt: int = 4  #: GenEval samples per prompt (its default)
    sample_steps: int = 20  #: Euler steps
    cfg_scale: float = 4.0  #: guidance scale "with guidance" (without: 1)

    def validate(self) -> None:
        if min(self.geneval_per_task, self.images_per_prompt, self.sample_steps) < 1 or self.num_heldout < 2:
            raise ConfigError("geneval_per_task, images_per_prompt and sample_steps must be >= 1, num_heldout >= 2 (gFD)")


@dataclasses.dataclass
class T2IReproduceConfig:
    """Tokenizers compared, the one T2I recipe, the stand-in judge and CLIP, the protocol and the seeds."""

    tokenizer: TokenizerTrainConfig = dataclasses.field(default_factory=TokenizerTrainConfig)  #: AlignTok's; baselines derive
    t2i: T2ITrainConfig = dataclasses.field(default_factory=T2ITrainConfig)  #: data.tokenizer and train.seed set per run
    judge: JudgeConfig = dataclasses.field(default_factory=JudgeConfig)
    clip: SceneCLIPConfig = dataclasses.field(default_factory=SceneCLIPConfig)
    eval: T2IEvalConfig = dataclasses.field(default_factory=T2IEvalConfig)
    methods: list[str] = dataclasses.field(default_factory=lambda: ["aligntok", "flux-vae", "vae"])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])  #: one tokenizer and T2I model per method and seed

    def validate(self) -> None:
        for method in self.methods:
            check_choice("methods", method, tuple(METHOD_STAGES))
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ConfigError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if self.eval.heldout_seed in self.seeds:
            raise ConfigError(f"seed {self.eval.heldout_seed} is the held-out seed; pick other seeds")
        if self.t2i.data.train != "builtin:scenes":
            raise ConfigError(f"t2i.data.train must be builtin:scenes (the judge and held-out captions are its), "
                              f"got {self.t2i.data.train!r}")


def load_t2i_reproduce_config(preset: str, overrides: Sequence[str] = ()) -> T2IReproduceConfig:
    """The demo's tokenizer and demo-t2i's T2I, judge and CLIP sections (their minimal presets too for
    t2i-minimal), the preset's changes over them, then ``key=value`` overrides."""
    check_choice("preset", preset, PRESETS)
    size = "minimal" if preset == "t2i-minimal" else "demo"
    bases: list[Any] = []
    for name in dict.fromkeys(["demo", size]):
        bases.append({"tokenizer": yaml.safe_load(preset_path(name).read_text())["tokenizer"]})
        t2i = yaml.safe_load(t2i_preset_path(name).read_text())
        bases.append({key: t2i[key] for key in ("t2i", "judge", "clip") if key in t2i})
    return load_config(T2IReproduceConfig, [*bases, preset_path(f"reproduce_{preset}")], overrides)


class _Runner:
    """The shared judge, scene CLIP, evaluation network, prompts and held-out set; one method and seed per call."""

    def __init__(self, rcfg: T2IReproduceConfig, out: Path, progress: Progress) -> None:
        from aligntok.data.scenes import make_scene_graph, render_scene_graphs
        from aligntok.eval.geneval_scenes import create_prompts, prompt_renders
        from aligntok.eval.t2i import CLIPScorer
        from aligntok.standins import ensure_eval_network, load_eval_network

        self.rcfg, self.out, self.progress = rcfg, out, progress
        self.timings: dict[str, float] = {}
        e, resolution = rcfg.eval, rcfg.t2i.data.resolution
        progress.say("stand-in judge and scene CLIP (trained once per output folder)")
        self.judge = ensure_judge(rcfg.judge, out / "judge", self.timings)
        self.clip_dir = ensure_scene_clip(rcfg.clip, out / "clip", self.timings)
        self.clip = CLIPScorer(self.clip_dir)
        self.network = load_eval_network(ensure_eval_network(e.eval_network, progress=progress.bars))
        self.metadata = create_prompts(seed=e.geneval_seed, n=e.geneval_per_task)
        self.prompts = [m["prompt"] for m in self.metadata for _ in range(e.images_per_prompt)]
        # The judge's ceiling images: real renders of scenes made for each prompt (the held-out seed's).
        self.real = prompt_renders(self.metadata, seed=e.heldout_seed, resolution=resolution,
                                   samples_per_prompt=e.images_per_prompt)
        graphs = [make_scene_graph(e.heldout_seed, i) for i in range(e.num_heldout)]
        self.heldout_captions = [g.caption for g in graphs]
        self.heldout = render_scene_graphs(graphs, resolution)

    def geneval(self, images: np.ndarray) -> dict[str, Any]:
        from aligntok.eval.geneval_scenes import miniature_geneval

        summary = miniature_geneval(self.judge.detect, images, self.metadata)
        return {"overall": summary["overall"], "tasks": {tag: t["score"] for tag, t in summary["tasks"].items()}}

    def ceilings(self) -> dict[str, Any]:
        from aligntok.standins.scene_clip import retrieval_accuracy

        return {"judge_ceiling": self.geneval(self.real),
                "clip_ceiling": {"retrieval_accuracy": retrieval_accuracy(self.clip_dir),
                                 "clip_score_real": mean_clip_score(self.clip, self.real, self.prompts)}}

    def run(self, method: str, seed: int) -> dict[str, Any]:
        """Train (or read back) one tokenizer and its T2I model; measure every checkpoint."""
        from aligntok.diffusion.t2i_sampling import T2IGenerator
        from aligntok.diffusion.t2i_training import train_t2i
        from aligntok.models.t2i import INFO_FILE
        from aligntok.training.checkpoint import (
            complete_checkpoints,
            load_tensors,
            read_trainer_state,
        )
        from aligntok.training.stages import train_tokenizer

        run_dir = self.out / "runs" / method / f"seed{seed}"
        progress = self.progress.child(f"{method}/seed{seed}")
        tok_cfg = tokenizer_for_method(seeded_tokenizer(self.rcfg.tokenizer, seed), method)
        progress.say(f"tokenizer ({method})")
        outputs = train_tokenizer(tok_cfg, run_dir / "tokenizer")
        tokenizer_dir = outputs[max(outputs)]
        t2i = self.rcfg.t2i
        t2i = dataclasses.replace(t2i, data=dataclasses.replace(t2i.data, tokenizer=str(tokenizer_dir), build_tokenizer=None),
                                  train=dataclasses.replace(t2i.train, seed=seed))
        model_dir = run_dir / "t2i" / "model"
        if not (model_dir / INFO_FILE).is_file():
            progress.say(f"FLUX-tiny on its latents ({t2i.train.steps} steps)")
            train_t2i(t2i, run_dir / "t2i")
        generator = T2IGenerator.load(model_dir, tokenizer_dir)
        result: dict[str, Any] = {"tokenizer": compute_once(run_dir / "results" / "tokenizer.json",
                                                            lambda: self.tokenizer_metrics(generator.tokenizer))}
        by_step = {}
        for path in complete_checkpoints(run_dir / "t2i" / "train"):
            step = int(read_trainer_state(path)["step"])

            def measure(path: Path = path, step: int = step) -> dict[str, Any]:
                progress.say(f"measuring the T2I checkpoint of step {step}")
                generator.model.load_state_dict(load_tensors(path / "ema_model.safetensors"))
                return self.measure(generator, seed)

            by_step[step] = compute_once(run_dir / "results" / f"step{step}.json", measure)
        if not by_step:
            raise ConfigError(f"{run_dir / 't2i' / 'train'} holds no complete checkpoint; set t2i.train.ckpt_every")
        result["by_training_step"] = by_step
        return result

    def tokenizer_metrics(self, tokenizer) -> dict[str, Any]:
        """The tokenizer's ceiling (judge and scene CLIP on its reconstructions of the prompt renders) and
        PSNR and rFD of its reconstructions of the held-out renders."""
        import torch

        from aligntok.eval.geneval_scenes import reconstruct
        from aligntok.eval.images import nhwc_to_tensor
        from aligntok.eval.recon import psnr
        from aligntok.standins import builtin_fd

        started = time.perf_counter()
        recon_prompts = reconstruct(tokenizer, self.real)
        recon = reconstruct(tokenizer, self.heldout)
        ceiling = self.geneval(recon_prompts)
        return {
            "tokenizer_ceiling": ceiling["overall"], "tokenizer_ceiling_tasks": ceiling["tasks"],
            "clip_score_reconstructions": mean_clip_score(self.clip, recon_prompts, self.prompts),
            "psnr": float(psnr(nhwc_to_tensor(self.heldout), nhwc_to_tensor(recon)).to(torch.float64).mean()),
            "rfd": builtin_fd(recon, self.heldout, network=self.network),
            "seconds": round(time.perf_counter() - started, 2),
        }

    def measure(self, generator, seed: int) -> dict[str, Any]:
        """GenEval and CLIP score of guided samples of the GenEval prompts; gFD of held-out captions with and without guidance."""
        from aligntok.standins import builtin_fd

        started = time.perf_counter()
        e = self.rcfg.eval
        prompts = [m["prompt"] for m in self.metadata]
        samples = generate(generator, prompts, e.images_per_prompt, steps=e.sample_steps, cfg_scale=e.cfg_scale, seed=seed)
        geneval = self.geneval(samples)
        result: dict[str, Any] = {"geneval_overall": geneval["overall"], "geneval_tasks": geneval["tasks"],
                                  "clip_score": mean_clip_score(self.clip, samples, self.prompts)}
        for kind, scale in (("guided", e.cfg_scale), ("unguided", 1.0)):
            images = generate(generator, self.heldout_captions, 1, steps=e.sample_steps, cfg_scale=scale, seed=seed)
            result[f"gfd_{kind}"] = builtin_fd(images, self.heldout, network=self.network)
        result["seconds"] = round(time.perf_counter() - started, 2)
        return result


def run_reproduce_t2i(out_dir: str | Path, *, preset: str = "t2i-quick", overrides: Sequence[str] = (),
                      progress: bool = True) -> Path:
    """Run the text-to-image reproduction into ``out_dir``; returns its report.html."""
    from aligntok.experiments.reproduce_t2i_report import write_t2i_reproduce_report

    rcfg = load_t2i_reproduce_config(preset, overrides)
    out = Path(out_dir)
    resumed = claim_folder(out, "reproduce", rcfg)  # then earlier invocations' time is not in "seconds"
    steps = Progress("reproduce", enabled=progress)
    runner = _Runner(rcfg, out, steps)
    shared = compute_once(out / "results" / "ceilings.json", runner.ceilings)
    runs: dict[str, dict[int, Any]] = {method: {} for method in rcfg.methods}
    for seed in rcfg.seeds:  # seed-major: a stopped run has every tokenizer at the same number of seeds
        for method in rcfg.methods:
            runs[method][seed] = runner.run(method, seed)
    results = {"preset": preset, "command": " ".join(["aligntok reproduce", f"--preset {preset}", *overrides]),
               "methods": rcfg.methods, "seeds": rcfg.seeds, "protocol": _protocol(rcfg), **shared,
               **summarize(runs), "timings_seconds": runner.timings}
    results["seconds"], results["resumed"] = round(steps.elapsed(), 1), resumed
    write_json(out / "results.json", results)
    report = write_t2i_reproduce_report(out, rcfg, results)
    steps.say(f"done in {results['seconds'] / 60:.1f} min: {report}")
    return report


def _protocol(rcfg: T2IReproduceConfig) -> dict[str, Any]:
    t2i = rcfg.t2i
    return {"data": t2i.data.train, "resolution": t2i.data.resolution, "t2i_preset": t2i.preset,
            "t2i_steps": t2i.train.steps, "t2i_batch_size": t2i.train.batch_size, "text_encoder": t2i.text.encoder,
            "tokenizer_steps": sum(rcfg.tokenizer.stage(n).train.steps for n in METHOD_STAGES["aligntok"]),
            **config_to_dict(rcfg.eval)}


def _stats(per_seed: list[dict[str, Any]], get) -> dict[str, Any]:
    return mean_std([get(r) for r in per_seed])


def summarize(runs: dict[str, dict[int, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of the final checkpoint's measurements and of every checkpoint's (curves)."""
    table, curves = {}, {}
    for method, by_seed in runs.items():
        per_seed = list(by_seed.values())
        finals = [r["by_training_step"][max(r["by_training_step"], key=int)] for r in per_seed]
        tokenizers = [r["tokenizer"] for r in per_seed]
        tasks = list(finals[0]["geneval_tasks"])
        table[method] = {
            "geneval_overall": _stats(finals, lambda r: r["geneval_overall"]),
            "geneval_tasks": {t: _stats(finals, lambda r, t=t: r["geneval_tasks"][t]) for t in tasks},
            **{key: _stats(finals, lambda r, key=key: r[key]) for key in ("gfd_guided", "gfd_unguided", "clip_score")},
            "tokenizer_ceiling": _stats(tokenizers, lambda r: r["tokenizer_ceiling"]),
            "tokenizer_ceiling_tasks": {t: _stats(tokenizers, lambda r, t=t: r["tokenizer_ceiling_tasks"][t]) for t in tasks},
            **{key: _stats(tokenizers, lambda r, key=key: r[key]) for key in ("psnr", "rfd", "clip_score_reconstructions")},
        }
        xs = sorted({int(s) for r in per_seed for s in r["by_training_step"]})
        curves[method] = {
            metric: [{"x": float(x), **mean_std([r["by_training_step"][s][metric] for r in per_seed
                                                 for s in r["by_training_step"] if int(s) == x])} for x in xs]
            for metric in CURVE_METRICS
        }
    return {"table": table, "curves": curves,
            "per_seed": {method: {str(seed): r for seed, r in by_seed.items()} for method, by_seed in runs.items()}}
