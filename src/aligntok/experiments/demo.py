"""``aligntok demo``: the whole method on the built-in data, offline, in a few minutes on a laptop CPU.

Stand-in foundation encoder (trained once and cached) -> the three AlignTok stages -> a latent cache ->
a small LightningDiT -> guided and unguided samples -> metrics -> ``report.html``. The embedded default
is ``presets/demo.yaml``; ``key=value`` overrides change any field (``dit.train.steps=300``).
"""

from __future__ import annotations

import dataclasses
import html
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.config import load_config
from aligntok.experiments.pipeline import (
    Experiment,
    ExperimentConfig,
    Progress,
    ensure_standins,
    torch_threads,
    write_json,
)

__all__ = ["PRESETS", "preset_path", "load_experiment_config", "run_demo"]

#: Embedded experiment presets (package data): name -> file under aligntok/experiments/presets.
PRESETS = ("demo", "minimal")
_GRID_COLUMNS = 8  # samples per class in the report's grids
_RECON_SHOWN = 10  # held-out images shown with their reconstructions
_PCA_FIT, _PCA_SHOWN = 64, 8  # held-out images the latent PCA is fitted on / shown


def preset_path(name: str) -> Path:
    return Path(str(resources.files("aligntok.experiments") / "presets" / f"{name}.yaml"))


def load_experiment_config(presets: list[str], overrides: list[str] = ()) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from embedded presets (merged in order) and ``key=value`` overrides."""
    return load_config(ExperimentConfig, [preset_path(name) for name in presets], overrides)


#: Keys of DIR/metrics.json (an interface: scripts read it).
METRICS_KEYS = (
    "psnr", "recon_class_accuracy", "orig_class_accuracy", "probe_accuracy", "guided_class_accuracy",
    "unguided_class_accuracy", "gfd_guided", "gfd_unguided", "wall_seconds",
)


def run_demo(out_dir: str | Path, *, preset: str = "demo", overrides: list[str] = (), progress: bool = True,
             threads: int = 2) -> Path:
    """Run the demo into ``out_dir`` and return the path of its report.html (re-running resumes).

    ``threads``: torch's CPU threads for the run (0: leave torch's setting); the demo's time budget is
    for a 2-core machine, where more threads than cores only add contention.
    """
    with torch_threads(threads):
        return _run_demo(out_dir, preset, overrides, progress)


def _run_demo(out_dir: str | Path, preset: str, overrides: list[str], progress: bool) -> Path:
    presets = ["demo"] if preset == "demo" else ["demo", preset]
    cfg = load_experiment_config(presets, list(overrides))
    out = Path(out_dir)
    steps = Progress("demo", enabled=progress)
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        started = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - started, 1)
        return value

    experiment = Experiment(cfg, out, steps)
    timings.update(ensure_standins(cfg, steps))
    timed("tokenizer, 3 stages", experiment.train_tokenizer)
    recon = {n: timed(f"tokenizer eval, stage {n}", experiment.evaluate_tokenizer, n) for n in cfg.tokenizer.stages}
    timed("latent cache + DiT", experiment.train_dit)

    kept: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
    guided = cfg.eval.sampler
    unguided = dataclasses.replace(guided, cfg_scale=1.0)
    generation = {}
    for name, sampler in (("guided", guided), ("unguided", unguided)):
        steps.say(f"sampling {cfg.eval.num_samples} images {name} (cfg {sampler.cfg_scale}, {sampler.num_steps} steps)")
        generation[name] = timed(
            f"sampling + eval, {name}", experiment.evaluate_samples, name, sampler,
            keep=lambda images, labels, _name=name: kept.__setitem__(_name, (images, labels)),
        )
    for name, sampler in (("guided", guided), ("unguided", unguided)):
        if name not in kept:  # results read back from an earlier run: draw the shown samples again
            dit = experiment.load_dit()
            kept[name] = experiment.generate(dit, experiment.load_tokenizer(), sampler, num=_GRID_COLUMNS * dit.num_classes)
    results = {"reconstruction": recon, "generation": generation, "timings_seconds": timings}
    report = _write_demo_report(experiment, results, kept)
    timings["total"] = round(steps.elapsed(), 1)
    write_json(out / "results" / "demo.json", results)
    write_json(out / "metrics.json", demo_metrics(results, experiment.final_stage))
    steps.say(f"done: {report}")
    return report


def demo_metrics(results: dict[str, Any], final_stage: int) -> dict[str, float | None]:
    """The headline numbers of ``results`` under :data:`METRICS_KEYS` (DIR/metrics.json).

    ``psnr``, the class accuracies and the probe are the final stage's on the held-out images;
    ``wall_seconds`` is this run's wall time (a resumed run reports only what it redid).
    """
    final = results["reconstruction"][final_stage]
    generation = results["generation"]
    values = {
        "psnr": final["psnr"],
        "recon_class_accuracy": final.get("recon_class_accuracy"),
        "orig_class_accuracy": final.get("orig_class_accuracy"),
        "probe_accuracy": final["linear_probe"],
        "guided_class_accuracy": generation["guided"]["class_accuracy"],
        "unguided_class_accuracy": generation["unguided"]["class_accuracy"],
        "gfd_guided": generation["guided"]["gfd"],
        "gfd_unguided": generation["unguided"]["gfd"],
        "wall_seconds": results["timings_seconds"]["total"],
    }
    return {key: values[key] for key in METRICS_KEYS}


def _class_grid(images: np.ndarray, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """One row per class, the first samples of that class left to right."""
    from aligntok.eval.report import image_grid

    rows = []
    for label in range(num_classes):
        chosen = images[(labels == label).numpy()][:_GRID_COLUMNS]
        blank = np.full((_GRID_COLUMNS - len(chosen), *images.shape[1:]), 255, np.uint8)
        rows.append(np.concatenate([chosen, blank]))
    return image_grid(np.concatenate(rows), columns=_GRID_COLUMNS)


def _loss_figures(experiment: Experiment) -> list[tuple[bytes, str]]:
    from aligntok.eval.report import loss_series, plot_curves, read_log
    from aligntok.training.logging import LOG_FILE
    from aligntok.training.stages import stage_train_dir

    tokenizer_series: dict[str, list] = {}
    offset = 0
    for number in experiment.cfg.tokenizer.stages:
        records = read_log(stage_train_dir(experiment.dir / "tokenizer", number) / LOG_FILE)
        tokenizer_series[f"stage {number}: L1"] = loss_series(records, "generator/l1", offset)
        if number == 2:
            tokenizer_series["stage 2: L_sp (weighted)"] = loss_series(records, "generator/sp_total", offset)
        offset += experiment.cfg.tokenizer.stage(number).train.steps
    dit = read_log(experiment.dir / "dit" / "train" / LOG_FILE)
    return [
        (plot_curves(tokenizer_series, title="Tokenizer stages", xlabel="step (stages in sequence)", ylabel="loss"),
         "Tokenizer: L1 reconstruction loss per stage, and the semantic preservation loss of stage 2."),
        (plot_curves({"rectified-flow loss": loss_series(dit, "model/loss")}, title="LightningDiT",
                     xlabel="step", ylabel="MSE + cosine"), "LightningDiT training loss on the cached latents."),
    ]


def _latent_rows(experiment: Experiment) -> list[str]:
    return ["stand-in encoder tokens (frozen, as pretrained)"] + [
        f"latent after stage {n}" for n in experiment.cfg.tokenizer.stages]


@torch.inference_mode()
def _latent_pca_figure(experiment: Experiment) -> np.ndarray:
    """Rows: held-out inputs, then PCA-to-RGB of the encoder's token grid and of each stage's latent."""
    from aligntok.eval.images import from_uint8
    from aligntok.eval.report import image_grid, pca_rgb

    images = experiment.heldout[0][:_PCA_FIT]
    side = images.shape[-1]
    x = from_uint8(images)
    first = experiment.load_tokenizer(min(experiment.cfg.tokenizer.stages))
    grids = [first.encoder(x)]  # the stage-1 tokenizer's encoder is frozen: the pretrained one
    grids += [experiment.encode(experiment.load_tokenizer(n), images) for n in experiment.cfg.tokenizer.stages]
    rows = [images[:_PCA_SHOWN].permute(0, 2, 3, 1).numpy()]
    rows += [pca_rgb(grid, size=side)[:_PCA_SHOWN] for grid in grids]
    return image_grid(np.concatenate(rows), columns=_PCA_SHOWN)


def _intro(experiment: Experiment) -> str:
    from aligntok.standins import read_standin_info

    cfg = experiment.cfg
    accuracy = read_standin_info(Path(experiment.eval_network.weights_path).parent).get("heldout_class_accuracy")
    encoder = cfg.tokenizer.model.encoder
    side = cfg.dit.model_config().input_size  # the latent side (the DiT is checked against the latents)
    lines = [
        f"<b>This is a miniature.</b> The foundation encoder is <code>{html.escape(encoder)}</code>"
        + (", a small DINOv2-architecture ViT trained on the built-in shapes and shipped with aligntok "
           "(aligntok.standins), not a real DINOv2" if encoder.startswith("standin:") else "")
        + f"; images are {experiment.resolution} px, the latent is "
        f"{cfg.tokenizer.model.latent_channels}x{side}x{side}, and the "
        f"LightningDiT has width {cfg.dit.model_config().hidden_size} and depth {cfg.dit.model_config().depth}.",
        "No pretrained network can be downloaded offline, so: gFD and rFD are Fréchet distances in the features of "
        f"a small CNN trained on the same data (evaluation network <code>{html.escape(cfg.eval.eval_network)}</code>, "
        + (f"held-out class accuracy {accuracy:.0%}" if isinstance(accuracy, float) else "accuracy unrecorded")
        + "), not Inception FIDs; class accuracy is that CNN's; the perceptual distance is LPIPS's formula with "
        "uniform weights on that CNN's feature maps, not LPIPS-VGG; the training loss's LPIPS term uses LPIPS's "
        "linear heads on a randomly initialised AlexNet.",
        "The numbers show the pipeline working end to end, not the paper's results; "
        "<code>aligntok reproduce</code> runs the comparisons with baselines and seeds.",
    ]
    return "<div class='note'>" + "<br>".join(lines) + "</div>"


def _write_demo_report(experiment: Experiment, results: dict[str, Any],
                       kept: dict[str, tuple[np.ndarray, torch.Tensor]]) -> Path:
    from aligntok.eval.report import Section, image_grid, png_bytes, write_report

    cfg = experiment.cfg
    stage_names = {n: stage.name for n, stage in cfg.tokenizer.stages.items()}
    recon_rows = [
        {"after stage": f"{n} ({stage_names[n]})", "PSNR dB": r["psnr"], "SSIM": r["ssim"],
         "perceptual (CNN)": r["perceptual"], "rFD": r["rfd"], "linear probe": r["linear_probe"]}
        for n, r in results["reconstruction"].items()
    ]
    generation_rows = [
        {"sampling": f"{name} (cfg {r['sampler']['cfg_scale']:g}, {r['sampler']['num_steps']} Euler steps)",
         "gFD": r["gfd"], "class accuracy": r["class_accuracy"], "samples": r["num_samples"]}
        for name, r in results["generation"].items()
    ]
    images, _ = experiment.heldout
    shown = images[:_RECON_SHOWN]
    rows = [shown] + [experiment.reconstruct(experiment.load_tokenizer(n), shown) for n in cfg.tokenizer.stages]
    pairs = image_grid(torch.cat(rows).permute(0, 2, 3, 1).numpy(), columns=_RECON_SHOWN)
    num_classes = cfg.dit.model_config().num_classes
    grids = [
        (png_bytes(_class_grid(images_, labels, num_classes), scale=2),
         f"{name}: one row per class ({', '.join(experiment.eval_network.class_names)})")
        for name, (images_, labels) in kept.items()
    ]
    timing_rows = [{"step": k, "seconds": v} for k, v in results["timings_seconds"].items()]
    sections = [
        Section("Metrics", "Reconstruction on held-out images (another seed than training) and the linear probe "
                "on average-pooled latents; generation against the same held-out images.",
                table=recon_rows),
        Section("Generation", table=generation_rows),
        Section("Inputs and reconstructions", "Top row: held-out inputs; then the reconstruction after each stage.",
                figures=[(png_bytes(pairs, scale=2), "inputs, stage 1, stage 2, stage 3")]),
        Section("Samples per class", figures=grids),
        Section("The latent space", "Each grid position's vector, coloured by the first three principal components "
                "(red, green, blue) of that row's representation, fitted jointly on "
                f"{_PCA_FIT} held-out images: similar colours are similar vectors. Stage 1 trains the adapter on "
                "frozen encoder tokens; stage 2's semantic preservation keeps the latent close to what the "
                "encoder saw while the encoder is fine-tuned; stage 3 trains only the decoder.",
                figures=[(png_bytes(_latent_pca_figure(experiment), scale=2),
                          "inputs, " + ", ".join(_latent_rows(experiment)))]),
        Section("Loss curves", figures=_loss_figures(experiment)),
        Section("Where the time went", "Wall-clock seconds of this run (cached steps take ~0).", table=timing_rows),
    ]
    return write_report(experiment.dir / "report.html", title="aligntok demo", intro=_intro(experiment),
                        sections=sections)
