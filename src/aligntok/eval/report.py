"""Self-contained HTML reports: metric tables, image grids and loss curves in one file.

Images are embedded as base64 PNG so a report can be mailed or committed as a single file; plots are
drawn with matplotlib's non-interactive backend from the trainers' ``log.jsonl`` files.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from aligntok.io import write_text_atomically


def read_log(path: str | Path) -> list[dict]:
    """The records of a trainer's ``log.jsonl`` (missing file: no records)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def image_grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images into one (rows*H, columns*W, 3) image with white gutters."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"image_grid expects (N, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
    n, h, w, _ = images.shape
    rows = max(1, math.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = image
    return grid


def pca_rgb(features, size: int | None = None) -> np.ndarray:
    """Feature grids (N, C, h, w) as RGB: their first three principal components, one per channel.

    The field's usual picture of a latent space: the PCA is fitted jointly on every position of all N
    grids (so one colour means one direction in every image), each component's sign is fixed so that
    its largest loading is positive, and each is scaled by its 1st..99th percentile over the set to
    0..255. ``size`` enlarges each grid to size x size with nearest-neighbour cells. Returns uint8
    (N, size or h, size or w, 3); with C < 3 the missing channels are 0.
    """
    import torch

    grids = torch.as_tensor(features).detach().double().cpu()
    if grids.ndim != 4:
        raise ValueError(f"pca_rgb expects (N, C, h, w) feature grids, got shape {tuple(grids.shape)}")
    n, c, h, w = grids.shape
    rows = grids.permute(0, 2, 3, 1).reshape(-1, c)
    rows = rows - rows.mean(dim=0)
    _, _, vh = torch.linalg.svd(rows, full_matrices=False)
    components = vh[:3]
    signs = components.gather(1, components.abs().argmax(dim=1, keepdim=True)).sign()
    projected = rows @ (components * signs).T  # (N*h*w, k)
    low = torch.quantile(projected, 0.01, dim=0)
    high = torch.quantile(projected, 0.99, dim=0)
    scaled = ((projected - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    rgb = torch.zeros(rows.shape[0], 3, dtype=torch.float64)
    rgb[:, : scaled.shape[1]] = scaled
    image = (rgb.reshape(n, h, w, 3) * 255).round().to(torch.uint8).numpy()
    if size is not None:
        image = image.repeat(size // h, axis=1).repeat(size // w, axis=2)
    return image


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """PNG encoding of an (H, W, 3) uint8 image, optionally enlarged with nearest-neighbour pixels."""
    pil = Image.fromarray(image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def plot_curves(
    series: Mapping[str, Sequence[tuple[float, ...]]], *, title: str, xlabel: str, ylabel: str,
    logy: bool = False, logx: bool = False,
) -> bytes:
    """A line plot of named (x, y) or (x, y, error) series as PNG bytes (errors drawn as bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    for name, points in series.items():
        if not points:
            continue
        columns = list(zip(*points))
        marker = "o" if len(points) < 12 else None
        if len(columns) == 3:
            ax.errorbar(columns[0], columns[1], yerr=columns[2], label=name, marker=marker, markersize=3, capsize=3)
        else:
            ax.plot(columns[0], columns[1], label=name, marker=marker, markersize=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def loss_series(records: Iterable[dict], key: str, step_offset: int = 0) -> list[tuple[float, float]]:
    """(step, value) pairs of one logged key, skipping records without it."""
    return [(r["step"] + step_offset, r[key]) for r in records if key in r and math.isfinite(r[key])]


@dataclasses.dataclass
class Section:
    """One part of a report: a heading, optional text, a table and figures (PNG bytes with captions)."""

    title: str
    text: str = ""
    table: list[dict] | None = None
    figures: list[tuple[bytes, str]] = dataclasses.field(default_factory=list)


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _table_html(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format(row.get(c, '')))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}figcaption{font-size:.85em;color:#555}
img{image-rendering:pixelated;max-width:100%}.note{background:#fff8e0;padding:.6em 1em;border-left:4px solid #e0b000}
"""


def write_report(path: str | Path, *, title: str, intro: str, sections: Sequence[Section]) -> Path:
    """Write one self-contained HTML file (text is escaped; ``intro`` may hold trusted HTML)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>", intro]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        if section.table:
            parts.append(_table_html(section.table))
        for data, caption in section.figures:
            encoded = base64.b64encode(data).decode("ascii")
            parts.append(
                f"<figure><img src='data:image/png;base64,{encoded}'><figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return write_text_atomically(path, "\n".join(parts))
