"""Re-train only the DiTs of a finished `aligntok reproduce` folder under changed DiT settings.

    python docs/reproduction/dit_variants.py RUN_DIR OUT_DIR --name NAME [--methods aligntok vae vavae]
        [--seeds 0 1 2] [--every 500] [--retrain-from-stage N] [--set KEY=VALUE ...]

``--set`` takes overrides of the experiment config (e.g. ``dit.optim.lr=2e-3 dit.train.steps=4500`` or
``dit.model.hidden_size=128 num_latents=4000``). Each method and seed reuses RUN_DIR's trained tokenizer (copied:
the latent cache writes its statistics into it), caches latents, trains a DiT and measures gFD and class accuracy
with and without guidance at every ``--every`` DiT steps, on RUN_DIR's held-out set and evaluation network.
Writes OUT_DIR/NAME/results.json and prints the mean curves and the steps each method needs to reach the plain
VAE's final gFD. Re-running resumes (every measurement is kept in its experiment's results/ folder).

Used for the "why" section of docs/reproduction/README.md: which DiT settings change the comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from aligntok.config import load_config
from aligntok.experiments.pipeline import (
    Experiment,
    ExperimentConfig,
    Progress,
    claim_folder,
    heldout_set,
    write_json,
)
from aligntok.experiments.reproduce import mean_std, steps_to_reach


def variant_experiment(run_dir: Path, out: Path, method: str, seed: int, overrides: list[str],
                       retrain_from: int | None = None) -> Experiment:
    """RUN_DIR's experiment with ``overrides``, its tokenizer stages copied (those from ``retrain_from`` on
    trained again under the overrides)."""
    source = run_dir / "runs" / method / f"seed{seed}"
    cfg = load_config(ExperimentConfig, source / "experiment.yaml", overrides)
    target = out / method / f"seed{seed}"
    claim_folder(target, "experiment", cfg)
    experiment = Experiment(cfg, target, Progress(f"{method}/seed{seed}"))
    final = experiment.final_stage
    first_retrained = final + 1 if retrain_from is None or method != "aligntok" else retrain_from
    for stage in range(1, min(first_retrained, final + 1)):
        stage_dir = experiment.tokenizer_dir(stage)
        if not (stage_dir / "config.json").is_file():
            shutil.rmtree(stage_dir, ignore_errors=True)
            shutil.copytree(source / "tokenizer" / stage_dir.name, stage_dir)
            # Its checkpoints too: a retrained next stage carries the discriminator on, as in the original run.
            train_dir = Path("train") / stage_dir.name
            if first_retrained <= final and (source / "tokenizer" / train_dir).is_dir():
                shutil.copytree(source / "tokenizer" / train_dir, target / "tokenizer" / train_dir, dirs_exist_ok=True)
    if first_retrained <= final:
        experiment.train_tokenizer(stages=tuple(range(first_retrained, final + 1)))
    return experiment


def run(run_dir: Path, out: Path, methods: list[str], seeds: list[int], every: int, overrides: list[str],
        retrain_from: int | None = None) -> dict:
    per_run: dict[str, dict[int, dict]] = {m: {} for m in methods}
    shared = None
    for seed in seeds:
        for method in methods:
            e = variant_experiment(run_dir, out, method, seed, overrides, retrain_from)
            if shared is None:
                shared = (heldout_set(e.cfg.eval, e.resolution, e.cfg.difficulty), e.eval_network)
            e.use_heldout(*shared[0])
            e.use_eval_network(shared[1])
            e.train_dit()
            guided = e.cfg.eval.sampler
            unguided = dataclasses.replace(guided, cfg_scale=1.0)
            points = [(step, path) for step, path in e.dit_checkpoints() if step % every == 0]
            per_run[method][seed] = {
                kind: {step: e.evaluate_samples(f"{kind}_step{step}", sampler, checkpoint=path)
                       for step, path in points}
                for kind, sampler in (("unguided", unguided), ("guided", guided))
            }
    return per_run


def summarize(per_run: dict[str, dict[int, dict]]) -> dict:
    curves: dict[str, dict] = {}
    for method, seeds in per_run.items():
        curves[method] = {}
        for kind in ("unguided", "guided"):
            points = []
            for s in sorted(next(iter(seeds.values()))[kind]):
                gfd = mean_std([r[kind][s]["gfd"] for r in seeds.values()])
                accuracy = mean_std([r[kind][s]["class_accuracy"] for r in seeds.values()])
                points.append({"step": s, "gfd": gfd["mean"], "gfd_std": gfd["std"], "class_accuracy": accuracy["mean"]})
            curves[method][kind] = points
    reach = {}
    if "vae" in curves:
        for kind in ("unguided", "guided"):
            target = curves["vae"][kind][-1]["gfd"]
            reach[kind] = {"target": target, **{
                method: steps_to_reach([{"x": p["step"], "mean": p["gfd"]} for p in curve[kind]], target)
                for method, curve in curves.items()}}
    return {"curves": curves, "steps_to_reach_vae_final_gfd": reach}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--methods", nargs="+", default=["aligntok", "vae", "vavae"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--every", type=int, default=500, help="measure every N DiT steps (a multiple of ckpt_every)")
    parser.add_argument("--retrain-from-stage", type=int, dest="retrain_from",
                        help="AlignTok: train its tokenizer again from this stage on (e.g. 3 with stage3 overrides)")
    parser.add_argument("--set", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="overrides of the experiment config")
    args = parser.parse_args()
    out = args.out_dir / args.name
    per_run = run(args.run_dir, out, args.methods, args.seeds, args.every, args.overrides, args.retrain_from)
    summary = {"overrides": args.overrides, "retrain_from_stage": args.retrain_from, "methods": args.methods, "seeds": args.seeds, **summarize(per_run),
               "per_seed": {m: {str(s): r for s, r in seeds.items()} for m, seeds in per_run.items()}}
    write_json(out / "results.json", summary)
    for method, curve in summary["curves"].items():
        for kind, points in curve.items():
            row = "  ".join(f"{p['step']}:{p['gfd']:.1f}/{100 * p['class_accuracy']:.0f}%" for p in points)
            print(f"{method:9s} {kind:9s} {row}")
    print(json.dumps(summary["steps_to_reach_vae_final_gfd"]))


if __name__ == "__main__":
    main()
