"""``aligntok reproduce``: the paper's comparisons in miniature, on the built-in data, under one protocol.

For every seed: AlignTok (three stages) and the two baselines (plain VAE, VA-VAE), each trained for the
same number of tokenizer steps, each followed by the same LightningDiT recipe; then

* the tokenizer table: reconstruction (PSNR, SSIM, perceptual distance, rFD), linear probe, gFD with
  and without guidance;
* the stage / w_sp ablation: stage 1 only; stages 1+2 with each w_sp; all three stages;
* the paper's convergence question first: in how many DiT training steps each tokenizer's DiT reaches the
  plain VAE's final gFD, with and without guidance, per seed (mean and spread) and on the mean curve;
* Figure 4's curves: gFD against DiT training steps (every DiT checkpoint, with and without guidance),
  against sampling steps and against the guidance scale (final DiT).

Seeds change every training's initialisation and data order and the sampling noise; the held-out set
and the evaluation network are shared. Results are mean +- standard deviation over seeds. Outputs:
``report.html``, ``plots/*.png`` and ``results.json``; every experiment keeps its own folder under
``runs/`` and re-running resumes.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from aligntok.config import ConfigError, check_choice, load_config
from aligntok.experiments.demo import PRESETS as EXPERIMENT_PRESETS
from aligntok.experiments.demo import preset_path
from aligntok.experiments.pipeline import (
    Experiment,
    ExperimentConfig,
    Progress,
    claim_folder,
    ensure_standins,
    heldout_set,
    write_json,
)
from aligntok.experiments.reproduce_report import write_reproduce_report
from aligntok.training.stages import METHOD_STAGES, TokenizerTrainConfig

__all__ = ["PRESETS", "ReproduceConfig", "load_reproduce_config", "run_reproduce"]

#: ``--preset`` names: presets/reproduce_NAME.yaml, merged over the demo's experiment.
PRESETS = ("quick", "full", "minimal")


@dataclasses.dataclass
class ReproduceConfig:
    """What is compared, over which seeds, and the curves' sweeps."""

    experiment: ExperimentConfig = dataclasses.field(default_factory=ExperimentConfig)  #: shared by every run
    methods: list[str] = dataclasses.field(default_factory=lambda: ["aligntok", "vae", "vavae"])  #: tokenizers compared
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])  #: one full pipeline per method and seed
    ablation_w_sp: list[float] = dataclasses.field(default_factory=lambda: [0.0, 1.0, 5.0])  #: stage-2 w_sp values
    ablation_seeds: list[int] | None = None  #: seeds the ablation runs for (None: every seed)
    sampling_steps: list[int] = dataclasses.field(default_factory=lambda: [5, 10, 20, 30, 50])  #: Fig. 4 (guided)
    cfg_scales: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  #: Fig. 4

    def validate(self) -> None:
        for method in self.methods:
            check_choice("methods", method, tuple(METHOD_STAGES))
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ConfigError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if self.ablation_seeds is not None and not set(self.ablation_seeds) <= set(self.seeds):
            raise ConfigError(f"ablation_seeds {self.ablation_seeds} must be among seeds {self.seeds}")
        if self.experiment.eval.heldout_seed in self.seeds:
            raise ConfigError(f"seed {self.experiment.eval.heldout_seed} is the held-out seed; pick other seeds")
        if any(s < 1 for s in self.sampling_steps) or any(c < 1 for c in self.cfg_scales):
            raise ConfigError("sampling_steps must be >= 1 and cfg_scales >= 1")


def load_reproduce_config(preset: str, overrides: Sequence[str] = ()) -> ReproduceConfig:
    """The demo's experiment (and the experiment preset of the same name, if any) as the base, the
    preset's changes over it, then ``key=value`` overrides."""
    check_choice("preset", preset, PRESETS)
    bases = ["demo"] + ([preset] if preset in EXPERIMENT_PRESETS and preset != "demo" else [])
    experiments = [{"experiment": yaml.safe_load(preset_path(name).read_text())} for name in bases]
    return load_config(ReproduceConfig, [*experiments, preset_path(f"reproduce_{preset}")], overrides)


def seeded_tokenizer(tok: TokenizerTrainConfig, seed: int) -> TokenizerTrainConfig:
    """``tok`` with every stage's training seed set to ``seed``."""
    stages = {
        f"stage{n}": dataclasses.replace(tok.stage(n), train=dataclasses.replace(tok.stage(n).train, seed=seed))
        for n in (1, 2, 3)
    }
    return dataclasses.replace(tok, **stages)


def seeded(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """``cfg`` with every training seed and the sampling seed set to ``seed``."""
    return dataclasses.replace(
        cfg,
        tokenizer=seeded_tokenizer(cfg.tokenizer, seed),
        dit=dataclasses.replace(cfg.dit, train=dataclasses.replace(cfg.dit.train, seed=seed)),
        eval=dataclasses.replace(cfg.eval, sample_seed=seed),
    )


def tokenizer_for_method(tok: TokenizerTrainConfig, method: str) -> TokenizerTrainConfig:
    """AlignTok's ``tok`` turned into ``method``'s: a baseline trains its one stage for as many steps as
    AlignTok's stages together (same budget)."""
    if method == "aligntok":
        return tok
    budget = sum(tok.stage(n).train.steps for n in METHOD_STAGES["aligntok"])
    stage1 = dataclasses.replace(tok.stage1, train=dataclasses.replace(tok.stage1.train, steps=budget))
    return dataclasses.replace(tok, method=method, stage1=stage1)


def for_method(cfg: ExperimentConfig, method: str) -> ExperimentConfig:
    """``cfg`` with :func:`tokenizer_for_method`'s tokenizer."""
    return dataclasses.replace(cfg, tokenizer=tokenizer_for_method(cfg.tokenizer, method))


def _with_w_sp(cfg: ExperimentConfig, w_sp: float) -> ExperimentConfig:
    tok = cfg.tokenizer
    return dataclasses.replace(cfg, tokenizer=dataclasses.replace(tok, semantic=dataclasses.replace(tok.semantic, weight=w_sp)))


def _copy_stages(source: Experiment, target: Experiment, stages: Sequence[int]) -> None:
    """Start an ablation from another experiment's trained stages (copied: the latent cache writes into them),
    with their training folders, whose last checkpoint hands the next stage its discriminator as in ``source``."""
    from aligntok.training.stages import stage_train_dir

    target.claim_folder()
    for number in stages:
        if (target.tokenizer_dir(number) / "config.json").is_file():
            continue
        for src, dst in ((source.tokenizer_dir(number), target.tokenizer_dir(number)),
                         (stage_train_dir(source.dir / "tokenizer", number), stage_train_dir(target.dir / "tokenizer", number))):
            shutil.rmtree(dst, ignore_errors=True)
            if src.is_dir():
                shutil.copytree(src, dst)


class _Runner:
    """Runs (or reads back) every experiment of a reproduction, sharing the held-out set and evaluation network."""

    def __init__(self, rcfg: ReproduceConfig, out: Path, progress: Progress) -> None:
        self.rcfg, self.out, self.progress = rcfg, out, progress
        self.heldout = None
        self.network = None

    def experiment(self, cfg: ExperimentConfig, name: str, final_stage: int | None = None) -> Experiment:
        experiment = Experiment(cfg, self.out / "runs" / name, self.progress.child(name), final_stage=final_stage)
        if self.heldout is None:
            self.heldout = heldout_set(cfg.eval, experiment.resolution, cfg.difficulty)
            self.network = experiment.eval_network
        experiment.use_heldout(*self.heldout)
        experiment.use_eval_network(self.network)
        return experiment

    def main_run(self, method: str, seed: int) -> dict[str, Any]:
        """One method and seed: tokenizer, DiT, the table's metrics and Figure 4's curves."""
        cfg = for_method(seeded(self.rcfg.experiment, seed), method)
        e = self.experiment(cfg, f"{method}/seed{seed}")
        e.train_tokenizer()
        result = self._measure(e)
        guided = cfg.eval.sampler
        unguided = dataclasses.replace(guided, cfg_scale=1.0)
        checkpoints = e.dit_checkpoints()
        result["by_training_step"] = {
            step: e.evaluate_samples(f"unguided_step{step}", unguided, checkpoint=path) for step, path in checkpoints
        }
        result["by_training_step_guided"] = {
            step: e.evaluate_samples(f"guided_step{step}", guided, checkpoint=path) for step, path in checkpoints
        }
        result["by_sampling_steps"] = {
            n: e.evaluate_samples(f"guided_{n}steps", dataclasses.replace(guided, num_steps=n))
            for n in self.rcfg.sampling_steps
        }
        result["by_cfg_scale"] = {
            scale: e.evaluate_samples(f"cfg{scale:g}", dataclasses.replace(guided, cfg_scale=scale))
            for scale in self.rcfg.cfg_scales
        }
        return result

    def ablation(self, seed: int) -> dict[str, Any]:
        """Stage 1 only, stages 1+2 for each w_sp (all from the main run's stage 1), and all three stages."""
        base = seeded(self.rcfg.experiment, seed)
        main = self.experiment(base, f"aligntok/seed{seed}")
        rows: dict[str, Any] = {}
        variants: list[tuple[str, ExperimentConfig, int]] = [("stage 1 only", base, 1)]
        variants += [(f"stages 1+2, w_sp={w:g}", _with_w_sp(base, w), 2) for w in self.rcfg.ablation_w_sp]
        for label, cfg, final_stage in variants:
            slug = label.replace(" ", "").replace(",", "_").replace("+", "").replace("=", "")
            e = self.experiment(cfg, f"ablation/seed{seed}/{slug}", final_stage=final_stage)
            # Stage 1 is the main run's; so is stage 2 where w_sp is the main run's (same seed: same training).
            same_stage2 = cfg.tokenizer.semantic.weight == base.tokenizer.semantic.weight
            _copy_stages(main, e, [1, 2] if final_stage == 2 and same_stage2 else [1])
            if final_stage == 2:
                e.train_tokenizer(stages=(2,))
            rows[label] = self._measure(e)
        rows["all three stages"] = self._measure(main)
        return rows

    @staticmethod
    def _measure(e: Experiment) -> dict[str, Any]:
        """The table's columns for one trained tokenizer: its metrics, then a DiT's gFD with and without guidance."""
        tokenizer = e.evaluate_tokenizer()
        e.train_dit()
        guided = e.cfg.eval.sampler
        return {
            "tokenizer": tokenizer,
            "guided": e.evaluate_samples("guided", guided),
            "unguided": e.evaluate_samples("unguided", dataclasses.replace(guided, cfg_scale=1.0)),
        }


def run_reproduce(out_dir: str | Path, *, preset: str = "quick", overrides: Sequence[str] = (),
                  progress: bool = True) -> Path:
    """Run the reproduction into ``out_dir``; returns its report.html."""

    rcfg = load_reproduce_config(preset, overrides)
    out = Path(out_dir)
    resumed = claim_folder(out, "reproduce", rcfg)  # then earlier invocations' time is not in "seconds"
    steps = Progress("reproduce", enabled=progress)
    runner = _Runner(rcfg, out, steps)
    ensure_standins(rcfg.experiment, steps)
    runs: dict[str, dict[int, Any]] = {method: {} for method in rcfg.methods}
    ablation: dict[int, Any] = {}
    # Seed-major order: after each seed every table has one more sample, so a stopped run is still readable.
    for seed in rcfg.seeds:
        for method in rcfg.methods:
            runs[method][seed] = runner.main_run(method, seed)
        if "aligntok" in rcfg.methods and rcfg.ablation_w_sp and seed in (rcfg.ablation_seeds or rcfg.seeds):
            ablation[seed] = runner.ablation(seed)
    results = summarize(rcfg, runs, ablation)
    results["preset"] = preset
    results["command"] = " ".join(["aligntok reproduce", f"--preset {preset}", *overrides])
    results["seconds"], results["resumed"] = round(steps.elapsed(), 1), resumed
    write_json(out / "results.json", results)
    report = write_reproduce_report(out, rcfg, results, runner.network)
    steps.say(f"done in {results['seconds'] / 60:.1f} min: {report}")
    return report


# ---------------------------------------------------------------------------------------------
# Aggregation over seeds
# ---------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the values themselves."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


_TOKENIZER_METRICS = ("psnr", "ssim", "perceptual", "rfd", "recon_class_accuracy", "linear_probe")


def _row(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    row = {m: mean_std([r["tokenizer"][m] for r in per_seed]) for m in _TOKENIZER_METRICS}
    for kind in ("guided", "unguided"):
        row[f"gfd_{kind}"] = mean_std([r[kind]["gfd"] for r in per_seed])
        row[f"class_accuracy_{kind}"] = mean_std([r[kind]["class_accuracy"] for r in per_seed])
    return row


def _curve(per_seed: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    points = sorted({float(x) for r in per_seed for x in r[key]})
    curve = []
    for x in points:
        values = [entry["gfd"] for r in per_seed for k, entry in r[key].items() if float(k) == x]
        curve.append({"x": x, **mean_std(values)})
    return curve


def steps_to_reach(curve: list[dict[str, Any]], target: float) -> float | None:
    """The first training step whose mean gFD is at or below ``target`` (None: never)."""
    return next((point["x"] for point in curve if point["mean"] <= target), None)


_STEP_CURVES = {"unguided": "by_training_step", "guided": "by_training_step_guided"}


def _steps_to_reach_vae(table: dict[str, Any], runs: dict[str, dict[int, Any]], curves: dict[str, Any],
                        kind: str) -> dict[str, Any]:
    """The paper's convergence question: DiT training steps until gFD (``kind`` of guidance) is at or below
    the plain VAE's final mean gFD, per seed (mean and spread over the seeds that reach it) and on the mean curve."""
    target = table["vae"][f"gfd_{kind}"]["mean"]
    key = _STEP_CURVES[kind]
    methods = {}
    for method, per_seed in runs.items():
        steps = [
            steps_to_reach([{"x": float(x), "mean": entry["gfd"]} for x, entry in
                            sorted(r[key].items(), key=lambda item: float(item[0]))], target)
            for r in per_seed.values()
        ]
        reached = [s for s in steps if s is not None]
        methods[method] = {
            "per_seed": steps, "reached": len(reached), "seeds": len(steps),
            "mean": mean_std(reached)["mean"] if reached else None,
            "std": mean_std(reached)["std"] if reached else None,
            "mean_curve": steps_to_reach(curves[method][key], target),
        }
    return {"target_gfd": target, "methods": methods}


def summarize(rcfg: ReproduceConfig, runs: dict[str, dict[int, Any]], ablation: dict[int, Any]) -> dict[str, Any]:
    table = {method: _row(list(per_seed.values())) for method, per_seed in runs.items()}
    curves = {
        method: {key: _curve(list(per_seed.values()), key)
                 for key in ("by_training_step", "by_training_step_guided", "by_sampling_steps", "by_cfg_scale")}
        for method, per_seed in runs.items()
    }
    reach: dict[str, Any] = {}
    if "vae" in runs:
        reach = {kind: _steps_to_reach_vae(table, runs, curves, kind) for kind in ("unguided", "guided")}
    ablation_rows = {}
    if ablation:
        labels = list(next(iter(ablation.values())))
        ablation_rows = {label: _row([ablation[seed][label] for seed in ablation]) for label in labels}
    return {
        "seeds": rcfg.seeds,
        "tokenizer_table": table,
        "ablation": ablation_rows,
        "curves": curves,
        "steps_to_reach_vae_final_gfd": reach,
        "per_seed": {method: {str(seed): r for seed, r in per_seed.items()} for method, per_seed in runs.items()},
        "ablation_per_seed": {str(seed): rows for seed, rows in ablation.items()},
    }

