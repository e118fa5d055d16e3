"""The measurements behind docs/reproduction's and docs/reproduction-t2i's "why" sections compute what their
READMEs say they do."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _script(name: str, folder: str = "reproduction"):
    spec = importlib.util.spec_from_file_location(name, DOCS / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latent_structure_tells_smooth_from_rough_and_class_from_noise():
    structure = _script("latent_structure").structure
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 100)
    rough = rng.normal(size=(1000, 4, 8, 8))
    # Smooth: each channel is a constant plane per image (all power at frequency 0), set by the class.
    smooth = np.broadcast_to(rng.normal(size=(10, 4, 1, 1))[labels], (1000, 4, 8, 8)) + 0.01 * rough
    r, s = structure(rough, labels), structure(smooth, labels)
    assert abs(r["adjacent_correlation"]) < 0.05 and s["adjacent_correlation"] > 0.99
    assert r["low_frequency_share"] < 0.2 and s["low_frequency_share"] > 0.99
    # Class means explain ~ (classes - 1) / images of white noise's variance, and nearly all of the class planes'.
    assert r["class_variance_share"] < 0.02 and s["class_variance_share"] > 0.99
    assert r["dims_99"] > 200 and s["dims_99"] <= 10
    assert abs(r["kurtosis"] - 3) < 0.1


def test_dit_variants_summary_finds_the_first_step_at_the_vaes_final_gfd():
    summarize = _script("dit_variants").summarize

    def run(gfds):
        return {kind: {step: {"gfd": g, "class_accuracy": 0.1} for step, g in zip((500, 1000, 1500), gfds)}
                for kind in ("unguided", "guided")}

    per_run = {"aligntok": {0: run([90, 40, 30]), 1: run([70, 40, 30])}, "vae": {0: run([100, 60, 50]), 1: run([100, 60, 50])}}
    summary = summarize(per_run)
    assert summary["steps_to_reach_vae_final_gfd"]["unguided"] == {"target": 50, "aligntok": 1000, "vae": 1500}
    first = summary["curves"]["aligntok"]["guided"][0]
    assert first["step"] == 500 and first["gfd"] == 80 and first["gfd_std"] > 0


def test_kind_probe_reads_the_window_around_a_cell_and_tells_signal_from_noise():
    script = _script("kind_probe", "reproduction-t2i")
    grid = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    window = script.windows(grid, torch.tensor([[0, 0], [2, 1]]))  # (column, row)
    assert window[0].tolist() == [0, 0, 0, 0, 0, 1, 0, 4, 5]  # zero padding above and left of the corner
    assert window[1].tolist() == [17, 18, 19, 21, 22, 23, 25, 26, 27]
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(4, (600,), generator=generator)
    signal = torch.nn.functional.one_hot(labels, 4).float() + 0.3 * torch.randn(600, 4, generator=generator)
    noise = torch.randn(600, 4, generator=generator)
    assert script.probe(signal, labels, 500, steps=300) > 0.95
    assert script.probe(noise, labels, 500, steps=300) < 0.45
