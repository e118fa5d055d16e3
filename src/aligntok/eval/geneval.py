"""GenEval's file formats, read and written exactly (djghosh13/geneval), so its official evaluator runs on aligntok samples.

GenEval (Ghosh et al., 2023) scores text-to-image alignment with an object detector over six tasks
(single_object, two_object, counting, colors, position, color_attr). Its evaluator needs CUDA and mmdet
2.x, so users run it outside aligntok; aligntok writes its input and summarises its output:

* **Prompts**: ``evaluation_metadata.jsonl``, one JSON object per line with at least ``prompt`` (and
  ``tag``, ``include``, ``exclude`` for the evaluator).
* **Images** (README "The generated format"): ``OUT/<index:05d>/metadata.jsonl`` (that prompt's metadata
  line), ``OUT/<index:05d>/samples/<j:04d>.png`` (n images per prompt, 4 by default) and an optional
  ``OUT/<index:05d>/grid.png``. The evaluator visits only digit-named folders and ``\\d+.png`` files.
* **Results**: ``results.jsonl`` from ``evaluation/evaluate_images.py``, one line per image with ``tag``,
  ``correct`` and ``metadata`` (the prompt's metadata as a JSON string), among others.

:func:`summarize_results` computes what ``evaluation/summary_scores.py`` prints: image and prompt
counts, the share of correct images and of prompts with at least one correct image, the score of each task
(its images' mean correctness, tasks in order of first appearance) and the overall score, the mean of
the task scores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

METADATA_FILE = "metadata.jsonl"
SAMPLES_DIR = "samples"
GRID_FILE = "grid.png"
GENEVAL_SAMPLES_PER_PROMPT = 4  #: images per prompt in GenEval's protocol
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  #: GenEval's tags


class GenEvalFormatError(ValueError):
    """A GenEval metadata or results file that does not follow GenEval's format (one-line message)."""


def _jsonl_objects(path: str | os.PathLike, what: str) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise GenEvalFormatError(f"{what} {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenEvalFormatError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise GenEvalFormatError(f"{path}:{number}: expected a JSON object per line")
        rows.append(row)
    if not rows:
        raise GenEvalFormatError(f"{path} holds no lines")
    return rows


def read_metadata(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The prompts' metadata of a GenEval ``evaluation_metadata.jsonl``, in file order; each has a ``prompt``."""
    rows = _jsonl_objects(path, "GenEval metadata file")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("prompt"), str):
            raise GenEvalFormatError(f"{path}: entry {number} has no 'prompt' string")
    return rows


def prompt_dir(out_dir: str | os.PathLike, index: int) -> Path:
    """``OUT/<index:05d>``: prompt ``index``'s folder."""
    return Path(out_dir) / f"{index:05d}"


def sample_path(out_dir: str | os.PathLike, index: int, sample: int) -> Path:
    """``OUT/<index:05d>/samples/<sample:04d>.png``."""
    return prompt_dir(out_dir, index) / SAMPLES_DIR / f"{sample:04d}.png"


def write_geneval_folder(out_dir: str | os.PathLike, metadata: Sequence[dict[str, Any]], images: np.ndarray,
                         *, grid: bool = True) -> list[Path]:
    """Write GenEval's image folder: ``images`` (uint8, (len(metadata) * n, H, W, 3), prompt k's n images
    consecutive) as ``OUT/<k:05d>/samples/<j:04d>.png`` with ``metadata.jsonl`` (and ``grid.png`` of the
    prompt's images). Every file is written atomically. Returns the prompt folders."""
    from aligntok.diffusion.sampling import _image_grid
    from aligntok.eval.images import write_png
    from aligntok.io import write_text_atomically

    if len(metadata) == 0 or images.ndim != 4 or len(images) % len(metadata):
        raise ValueError(f"{len(images)} images do not split evenly over {len(metadata)} prompts")
    n = len(images) // len(metadata)
    folders = []
    for k, entry in enumerate(metadata):
        folder = prompt_dir(out_dir, k)
        (folder / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
        own = images[k * n : (k + 1) * n]
        for j, image in enumerate(own):
            write_png(image, sample_path(out_dir, k, j))
        if grid:
            write_png(_image_grid(own), folder / GRID_FILE)
        # GenEval's evaluator json.load()s this file: the prompt's one metadata line.
        write_text_atomically(folder / METADATA_FILE, json.dumps(entry) + "\n")
        folders.append(folder)
    return folders


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """GenEval's ``results.jsonl`` rows; each must have ``tag``, a boolean ``correct`` and ``metadata``."""
    rows = _jsonl_objects(path, "GenEval results file")
    for number, row in enumerate(rows, start=1):
        missing = [key for key in ("tag", "correct", "metadata") if key not in row]
        if missing:
            raise GenEvalFormatError(f"{path}: line {number} lacks {', '.join(missing)} (is it GenEval's results.jsonl?)")
        if not isinstance(row["correct"], bool):
            raise GenEvalFormatError(f"{path}: line {number} has correct={row['correct']!r}, expected true or false")
    return rows


def summarize_results(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What GenEval's ``summary_scores.py`` reports, as numbers (fractions, not percentages).

    Prompts are told apart by their ``metadata`` string, as there; tasks are listed in order of first
    appearance; ``overall`` is the unweighted mean of the task scores.
    """
    if not rows:
        raise GenEvalFormatError("no results to summarise")
    by_prompt: dict[str, list[bool]] = {}
    by_task: dict[str, list[bool]] = {}
    for row in rows:
        key = row["metadata"] if isinstance(row["metadata"], str) else json.dumps(row["metadata"], sort_keys=True)
        by_prompt.setdefault(key, []).append(row["correct"])
        by_task.setdefault(row["tag"], []).append(row["correct"])
    tasks = {tag: {"score": float(np.mean(c)), "correct": int(sum(c)), "total": len(c)} for tag, c in by_task.items()}
    return {
        "num_images": len(rows),
        "num_prompts": len(by_prompt),
        "correct_images": float(np.mean([row["correct"] for row in rows])),
        "correct_prompts": float(np.mean([any(c) for c in by_prompt.values()])),
        "tasks": tasks,
        "overall": float(np.mean([task["score"] for task in tasks.values()])),
    }


def evaluate_geneval_summary(results: str | os.PathLike) -> dict[str, Any]:
    """:func:`summarize_results` of a ``results.jsonl`` with provenance (the file's sha256), for the JSON output."""
    from aligntok.eval.provenance import build_provenance, sha256_file

    summary = summarize_results(read_results(results))
    summary["provenance"] = build_provenance(
        num_samples=summary["num_images"], reference=None, feature_networks=[],
        settings={"protocol": "GenEval summary_scores.py (djghosh13/geneval): task score = mean correctness of its "
                              "images; overall = mean of the task scores",
                  "results": {"path": str(results), "sha256": sha256_file(results)}},
    )
    return summary


def summary_lines(result: dict[str, Any]) -> list[str]:
    """GenEval's summary printout (same quantities and order as summary_scores.py)."""
    lines = [f"geneval: {result['num_images']} images, {result['num_prompts']} prompts",
             f"  % correct images: {result['correct_images']:.2%}",
             f"  % correct prompts: {result['correct_prompts']:.2%}"]
    lines += [f"  {tag:<16} = {t['score']:.2%} ({t['correct']} / {t['total']})" for tag, t in result["tasks"].items()]
    lines.append(f"  Overall score (avg. over tasks): {result['overall']:.5f}")
    return lines
