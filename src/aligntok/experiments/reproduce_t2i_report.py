"""report.html and plots/*.png of ``aligntok reproduce --preset t2i-*`` from its summarized results."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from aligntok.eval.report import Section, write_report
from aligntok.experiments.pipeline import duration_text
from aligntok.experiments.reproduce_report import (
    METHOD_LABELS,
    curve_figure,
    stats_cell,
)

_CURVES = (  # (results key, file name, title, y label)
    ("geneval_overall", "t2i_geneval_vs_training_steps", "Miniature GenEval overall vs T2I training steps (guided)",
     "GenEval overall (stand-in judge)"),
    ("gfd_guided", "t2i_gfd_vs_training_steps_guided", "gFD on held-out captions vs T2I training steps (guided)",
     "gFD (evaluation CNN)"),
    ("gfd_unguided", "t2i_gfd_vs_training_steps", "gFD on held-out captions vs T2I training steps (no guidance)",
     "gFD (evaluation CNN)"),
    ("clip_score", "t2i_clip_score_vs_training_steps", "Scene-CLIP score vs T2I training steps (guided)",
     "CLIP score (scene CLIP)"),
)


def sample_figures(out: Path, rcfg, images_per_prompt: int = 4) -> list[tuple[bytes, str]]:
    """For the first prompt of each GenEval task: a real render, then each tokenizer's final model's samples
    (first seed; the GenEval prompts' sampling settings), as report figures."""
    import numpy as np

    from aligntok.diffusion.t2i_sampling import T2IGenerator
    from aligntok.eval.geneval_scenes import create_prompts, prompt_renders
    from aligntok.eval.report import image_grid, png_bytes
    from aligntok.experiments.demo_t2i import generate
    from aligntok.models.t2i import read_t2i_info

    e, seed = rcfg.eval, rcfg.seeds[0]
    firsts = {}
    for m in create_prompts(seed=e.geneval_seed, n=e.geneval_per_task):
        firsts.setdefault(m["tag"], m)
    metadata = list(firsts.values())
    prompts = [m["prompt"] for m in metadata]
    rows = [prompt_renders(metadata, seed=e.heldout_seed, resolution=rcfg.t2i.data.resolution,
                           samples_per_prompt=images_per_prompt)]
    names = ["real renders"]
    for method in rcfg.methods:
        model_dir = out / "runs" / method / f"seed{seed}" / "t2i" / "model"
        generator = T2IGenerator.load(model_dir, read_t2i_info(model_dir)["tokenizer"])
        rows.append(generate(generator, prompts, images_per_prompt, steps=e.sample_steps, cfg_scale=e.cfg_scale, seed=seed))
        names.append(METHOD_LABELS.get(method, method))
    figures = []
    n = images_per_prompt
    for k, meta in enumerate(metadata):
        images = np.concatenate([row[k * n : (k + 1) * n] for row in rows])
        figures.append((png_bytes(image_grid(images, columns=n), scale=2),
                        f"{meta['tag']}: \"{meta['prompt']}\"; rows: {', '.join(names)} (seed {seed})"))
    return figures


def write_t2i_reproduce_report(out: Path, rcfg, results: dict[str, Any]) -> Path:
    seeds = len(rcfg.seeds)
    table, judge = results["table"], results["judge_ceiling"]
    label = {m: METHOD_LABELS.get(m, m) for m in table}
    headline = [{
        "tokenizer": label[m], "GenEval overall": stats_cell(row["geneval_overall"]),
        "gFD w/o guidance": stats_cell(row["gfd_unguided"]), "gFD w/ guidance": stats_cell(row["gfd_guided"]),
        "CLIP score": stats_cell(row["clip_score"]), "tokenizer ceiling (GenEval)": stats_cell(row["tokenizer_ceiling"]),
        "PSNR dB": stats_cell(row["psnr"]), "rFD": stats_cell(row["rfd"]),
    } for m, row in table.items()]
    tasks = list(judge["tasks"])
    per_task = [{"tokenizer": label[m], "row": "generated", "overall": stats_cell(row["geneval_overall"]),
                 **{t: stats_cell(row["geneval_tasks"][t]) for t in tasks}} for m, row in table.items()]
    per_task += [{"tokenizer": label[m], "row": "tokenizer ceiling", "overall": stats_cell(row["tokenizer_ceiling"]),
                  **{t: stats_cell(row["tokenizer_ceiling_tasks"][t]) for t in tasks}} for m, row in table.items()]
    per_task.append({"tokenizer": "real renders", "row": "judge ceiling", "overall": f"{judge['overall']:.4g}",
                     **{t: f"{judge['tasks'][t]:.4g}" for t in tasks}})
    clip = results["clip_ceiling"]
    ceilings = [
        {"reference": "scene CLIP: top-1 retrieval on held-out real pairs", "value": clip["retrieval_accuracy"]},
        {"reference": "scene CLIP score of real renders of the GenEval prompts", "value": clip["clip_score_real"]},
        *({"reference": f"scene CLIP score of {label[m]}'s reconstructions of them",
           "value": stats_cell(row["clip_score_reconstructions"])} for m, row in table.items()),
    ]
    figures = [curve_figure(out / "plots", name, {m: c[key] for m, c in results["curves"].items()}, title=title,
                            xlabel="T2I training step", ylabel=ylabel, seeds=seeds) for key, name, title, ylabel in _CURVES]
    p = results["protocol"]
    intro = (
        "<div class='note'>The paper's text-to-image claim in miniature on <code>builtin:scenes</code> at "
        f"{p['resolution']} px: every tokenizer trains {p['tokenizer_steps']} steps on scenes (AlignTok's three stages "
        f"together; a baseline's one stage as long), then the same {html.escape(str(p['t2i_preset']))} transformer with "
        f"the text encoder <code>{html.escape(p['text_encoder'])}</code> trains {p['t2i_steps']} steps at batch "
        f"{p['t2i_batch_size']} on its latents. GenEval: the six tasks and GenEval's scoring rules on "
        f"{p['geneval_per_task']} prompts per task x {p['images_per_prompt']} images, judged by a stand-in detector "
        f"trained on renders, with guidance {p['cfg_scale']:g}, {p['sample_steps']} Euler steps. gFD: one sample per "
        f"held-out caption ({p['num_heldout']} captions of scenes drawn with seed {p['heldout_seed']}) against those "
        f"scenes' renders, in the pooled features of the evaluation CNN <code>{html.escape(p['eval_network'])}</code> "
        "(not Inception, not COCO); CLIP score: 100 * max(cos, 0) in a scene CLIP trained on renders. "
        "HPSv2, PickScore and ImageReward have no miniature. "
        f"Mean ± sample standard deviation over seeds {', '.join(map(str, rcfg.seeds))}, final checkpoint.<br>"
        f"Command: <code>{html.escape(results['command'])}</code> ({duration_text(results)}).</div>"
    )
    sections = [
        Section("Tokenizers compared (the paper: AlignTok vs FLUX VAE, same transformer and steps)", table=headline),
        Section("Miniature GenEval per task, with the ceilings",
                "Tokenizer ceiling: the judge on the tokenizer's reconstructions of real renders of the prompts (a "
                "generator on that tokenizer cannot beat it); judge ceiling: the judge on the renders themselves.",
                table=per_task),
        Section("CLIP-score references", table=ceilings),
        Section("Curves against T2I training steps", figures=figures),
        Section("Samples", "One prompt per GenEval task: real renders of scenes made for it, then each tokenizer's "
                "final T2I model's samples.", figures=sample_figures(out, rcfg)),
    ]
    return write_report(out / "report.html", title=f"aligntok reproduce ({results['preset']})", intro=intro,
                        sections=sections)
