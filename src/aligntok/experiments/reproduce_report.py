"""report.html and plots/*.png of ``aligntok reproduce`` from its summarized results."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from aligntok.eval.report import Section, plot_curves, write_report
from aligntok.experiments.pipeline import duration_text
from aligntok.io import replace_atomically

_TABLE_COLUMNS = (  # (results key, column title)
    ("psnr", "PSNR dB"), ("ssim", "SSIM"), ("perceptual", "perceptual (CNN)"), ("rfd", "rFD"),
    ("recon_class_accuracy", "reconstructions' class acc."), ("linear_probe", "linear probe"),
    ("gfd_unguided", "gFD w/o guidance"), ("gfd_guided", "gFD w/ guidance"), ("class_accuracy_guided", "class acc. w/ guidance"),
)
_CURVES = (  # (results key, file name, title, x label, log x)
    ("by_training_step", "gfd_vs_training_steps", "gFD vs DiT training steps (no guidance)", "DiT training step", False),
    ("by_training_step_guided", "gfd_vs_training_steps_guided", "gFD vs DiT training steps (guided)",
     "DiT training step", False),
    ("by_sampling_steps", "gfd_vs_sampling_steps", "gFD vs sampling steps (guided)", "Euler steps", True),
    ("by_cfg_scale", "gfd_vs_cfg_scale", "gFD vs guidance scale", "classifier-free guidance scale", False),
)


def stats_cell(stats: dict[str, Any]) -> str:
    """A table cell "mean ± std" of :func:`aligntok.experiments.reproduce.mean_std`'s statistics."""
    return f"{stats['mean']:.4g} ± {stats['std']:.2g}"


#: How the reports name each tokenizer method.
METHOD_LABELS = {"aligntok": "AlignTok", "vae": "VAE", "vavae": "VA-VAE", "flux-vae": "FLUX VAE"}


def curve_figure(plots: Path, name: str, curves: dict[str, list[dict[str, Any]]], *, title: str, xlabel: str,
                 ylabel: str, seeds: int, logx: bool = False) -> tuple[bytes, str]:
    """One report figure of per-method curves (lists of ``{x, mean, std}``) with error bars, also written to
    ``plots/NAME.png``: (PNG bytes, caption)."""
    series = {METHOD_LABELS.get(m, m): [(p["x"], p["mean"], p["std"]) for p in points] for m, points in curves.items()}
    png = plot_curves(series, title=title, xlabel=xlabel, ylabel=ylabel, logx=logx)
    plots.mkdir(exist_ok=True)
    replace_atomically(plots / f"{name}.png", lambda staging: staging.write_bytes(png))
    return png, f"{title}; mean ± std over {seeds} seeds (plots/{name}.png)"


def _rows(table: dict[str, dict[str, Any]], label: str, names: dict[str, str] | None = None) -> list[dict]:
    return [{label: (names or {}).get(key, key), **{title: stats_cell(row[k]) for k, title in _TABLE_COLUMNS}}
            for key, row in table.items()]


def write_reproduce_report(out: Path, rcfg, results: dict[str, Any], network) -> Path:
    from aligntok.standins import read_standin_info

    figures = [curve_figure(out / "plots", name, {m: curves[key] for m, curves in results["curves"].items()},
                            title=title, xlabel=xlabel, ylabel="gFD (evaluation CNN)", seeds=len(rcfg.seeds), logx=logx)
               for key, name, title, xlabel, logx in _CURVES]

    reach_rows = []
    for kind, entry in results["steps_to_reach_vae_final_gfd"].items():
        for m in rcfg.methods:
            r = entry["methods"].get(m)
            if r is None:
                continue
            per_seed = "not reached" if r["mean"] is None else f"{r['mean']:.0f} ± {r['std']:.0f}"
            reach_rows.append({
                "guidance": kind, "tokenizer": METHOD_LABELS[m], "VAE's final gFD": f"{entry['target_gfd']:.4g}",
                "steps (mean ± std over seeds that reach it)": per_seed,
                "seeds reaching it": f"{r['reached']} of {r['seeds']}",
                "on the mean curve": "not reached" if r["mean_curve"] is None else f"step {r['mean_curve']:g}",
            })
    accuracy = read_standin_info(Path(network.weights_path).parent).get("heldout_class_accuracy")
    exp = rcfg.experiment
    intro = (
        "<div class='note'>The paper's comparisons in miniature on the built-in shapes dataset: "
        f"foundation encoder <code>{html.escape(exp.tokenizer.model.encoder)}</code>, "
        f"{exp.tokenizer.data.resolution} px images, {exp.tokenizer.model.latent_channels}-channel "
        f"{exp.dit.model_config().input_size}x{exp.dit.model_config().input_size} latents, a "
        f"width-{exp.dit.model_config().hidden_size} depth-{exp.dit.model_config().depth} LightningDiT trained "
        f"{exp.dit.train.steps} steps, {exp.eval.num_samples} samples per gFD, {exp.eval.num_heldout} held-out images. "
        f"gFD and rFD are Fréchet distances in the features of a CNN trained on the same data "
        f"(<code>{html.escape(exp.eval.eval_network)}</code>, held-out class accuracy "
        f"{accuracy:.0%}), not Inception FIDs; the perceptual distance is LPIPS's formula with uniform weights on "
        f"that CNN. Baselines train one stage for as many steps as AlignTok's three stages together. "
        f"Mean ± sample standard deviation over seeds {', '.join(map(str, rcfg.seeds))}.<br>"
        f"Command: <code>{html.escape(results['command'])}</code> ({duration_text(results)}).</div>"
    )
    names = {m: METHOD_LABELS[m] for m in results["tokenizer_table"]}
    sections = [
        Section("Tokenizers compared (the paper's Table: vanilla VAE vs VA-VAE vs AlignTok)",
                table=_rows(results["tokenizer_table"], "tokenizer", names)),
        Section("Convergence", "Training steps each tokenizer's DiT needs to reach the plain VAE's final gFD "
                "(the paper: AlignTok about 5x faster than VA-VAE), at the DiT checkpoints of the curves below.",
                table=reach_rows),
        Section("Figure 4: gFD curves", figures=figures),
    ]
    if results["ablation"]:
        sections.insert(1, Section("Stage and w_sp ablation (AlignTok)", table=_rows(results["ablation"], "setting")))
    return write_report(out / "report.html", title=f"aligntok reproduce ({results['preset']})", intro=intro,
                        sections=sections)
