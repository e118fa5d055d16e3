"""The JSON file every ``aligntok evaluate`` command writes (strict JSON, atomically, by rank 0) and the short
summary it prints."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from aligntok.eval.recon import PSNR_MAX_DB
from aligntok.io import write_text_atomically


def default_output_path(source: str | os.PathLike, kind: str) -> Path:
    """``SOURCE.eval-KIND.json`` beside a local file or directory (e.g. ``runs/x/stage3.eval-recon.json``)."""
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{source} does not exist (for a hub id, name the result file with --out FILE.json)")
    name = path.stem if path.is_file() else path.resolve().name
    return path.resolve().parent / f"{name}.eval-{kind}.json"


def output_path(out: str | os.PathLike | None, source: str | os.PathLike, kind: str) -> Path:
    """Where an evaluate command writes: ``out``, else :func:`default_output_path`; its folder is made and a file
    written there and removed, so an unwritable output fails before the evaluation runs, not after it (a
    one-line ValueError)."""
    path = Path(out) if out is not None else default_output_path(source, kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write the result to {path}: {e.strerror or e}") from None
    return path


def _strict_json(value: Any) -> Any:
    """Plain JSON types; non-finite floats become null (JSON has no inf/nan), numpy scalars Python ones."""
    if isinstance(value, Mapping):
        return {str(key): _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_result(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``result`` as strict JSON, atomically (a reader never sees half a file).

    Non-finite numbers (e.g. an FID of singular statistics) are written as null and listed under
    ``non_finite`` with their value.
    """
    path = Path(path)
    document = dict(result)
    non_finite = {
        key: str(value) for key, value in result.items() if isinstance(value, float) and not math.isfinite(value)
    }
    if non_finite:
        document["non_finite"] = non_finite
    return write_text_atomically(path, json.dumps(_strict_json(document), indent=2, allow_nan=False) + "\n")


def _number(value: Any, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summarize(kind: str, result: Mapping[str, Any]) -> str:
    """A few human-readable lines for ``kind`` in recon, gen, probe, t2i, geneval."""
    if kind == "recon":
        lines = [
            f"recon: {result['num_images']} images ({result['num_skipped']} skipped"
            + (f", {result['num_exact_images']} reconstructed exactly, PSNR capped at {PSNR_MAX_DB:g} dB"
               if result.get("num_exact_images") else "") + ")",
            (
                f"  PSNR {_number(result['psnr'], 3)} dB  SSIM {_number(result['ssim'], 4)}  "
                f"LPIPS {_number(result['lpips'], 4)}  rFID {_number(result['rfid'], 4)}"
            ),
        ]
    elif kind == "gen":
        lines = [
            f"gen: {result['num_samples']} samples vs {result['num_reference_images'] or 'precomputed'} references",
            (
                f"  FID {_number(result['fid'], 4)}  IS {_number(result['inception_score'], 3)}  "
                f"precision {_number(result['precision'], 4)}  recall {_number(result['recall'], 4)}  "
                f"FD_DINOv2 {_number(result.get('fd_dinov2'), 4)}"
            ),
        ]
    elif kind == "probe":
        lines = [
            (
                f"probe: {result['num_images']} train images, {result['num_classes']} classes "
                f"({result['num_skipped']} skipped)"
            ),
            (
                f"  linear probe {_number(100 * result['linear_probe_accuracy'], 2)}% "
                f"(chance {_number(100 * result['chance_accuracy'], 2)}%)  CKNNA {_number(result['cknna'], 4)}"
            ),
        ]
    elif kind == "t2i":
        from aligntok.eval.t2i import summary_lines

        lines = summary_lines(dict(result))
    elif kind == "geneval":
        from aligntok.eval.geneval import summary_lines as geneval_lines

        lines = geneval_lines(dict(result))
    else:
        raise ValueError(f"unknown evaluation kind {kind!r}")
    lines += [f"  note: {note}" for note in result.get("notes", [])]
    lines += [f"  warning: {warning}" for warning in result.get("warnings", [])]
    return "\n".join(lines)


def publish_result(kind: str, result: Mapping[str, Any], out: str | os.PathLike) -> None:
    """What every `aligntok evaluate KIND` ends with: rank 0 writes the JSON and prints the summary; then
    the process group (if any) ends."""
    from aligntok.training.distributed import destroy_distributed, is_main

    if is_main():
        write_result(result, out)
        print(summarize(kind, result))
        print(f"wrote {out}")
    destroy_distributed()
