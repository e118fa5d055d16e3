"""HTML reports: grids, tables and figures end up in one self-contained file."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from aligntok.eval.report import (
    Section,
    image_grid,
    loss_series,
    pca_rgb,
    plot_curves,
    png_bytes,
    read_log,
    write_report,
)


def test_image_grid_places_each_image_in_its_cell():
    images = np.stack([np.full((4, 5, 3), i * 40, np.uint8) for i in range(5)])
    grid = image_grid(images, columns=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 6 + 1, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        cell = grid[1 + r * 5 : 1 + r * 5 + 4, 1 + c * 6 : 1 + c * 6 + 5]
        assert (cell == i * 40).all()
    assert (grid[1 + 5 : 1 + 5 + 4, 1 + 2 * 6 : 1 + 2 * 6 + 5] == 255).all()  # the empty sixth cell
    with pytest.raises(ValueError, match="uint8"):
        image_grid(images.astype(np.float32), columns=2)


def test_report_embeds_tables_and_figures(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 4)) + "\n")
    records = read_log(log)
    assert loss_series(records, "loss", step_offset=10) == [(11, 1.0), (12, 0.5), (14, 0.25)]
    assert read_log(tmp_path / "missing.jsonl") == []
    picture = png_bytes(np.zeros((3, 3, 3), np.uint8), scale=4)
    plot = plot_curves({"loss": loss_series(records, "loss")}, title="t", xlabel="step", ylabel="loss")
    path = write_report(
        tmp_path / "report.html", title="A <demo>", intro="<p class='note'>hi</p>",
        sections=[Section("Numbers", "psnr & co", table=[{"model": "x", "psnr": 21.123456}], figures=[(picture, "grid"), (plot, "curve")])],
    )
    text = path.read_text()
    assert "A &lt;demo&gt;" in text and "psnr &amp; co" in text and "<td>21.12</td>" in text
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(embedded) == 2
    assert Image.open(io.BytesIO(base64.b64decode(embedded[0]))).size == (12, 12)


def test_pca_rgb_colours_positions_by_their_principal_directions():
    import torch

    # Two kinds of positions along one direction (left half +d, right half -d) plus tiny noise in another:
    # the first component separates the halves into red extremes, the same in every image.
    direction = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0]) / 5
    grids = torch.zeros(2, 5, 4, 4)
    grids[:, :, :, :2] = direction.view(1, 5, 1, 1)
    grids[:, :, :, 2:] = -direction.view(1, 5, 1, 1)
    grids[:, 4] += 0.01 * torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0))
    rgb = pca_rgb(grids, size=8)
    assert rgb.shape == (2, 8, 8, 3) and rgb.dtype == np.uint8
    # The sign is fixed by the largest loading (+4/5 on channel 1): +direction is the bright red side.
    assert (rgb[:, :, :4, 0] == 255).all() and (rgb[:, :, 4:, 0] == 0).all()
    assert np.array_equal(pca_rgb(grids), pca_rgb(grids.double()))
    assert pca_rgb(grids[:, :2]).shape == (2, 4, 4, 3) and (pca_rgb(grids[:, :2])[..., 2] == 0).all()
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        pca_rgb(grids[0])
