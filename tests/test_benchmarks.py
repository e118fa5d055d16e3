"""Every benchmark runs end to end at toy sizes (no timing assertions: the numbers mean nothing here)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_DIT = ["--device", "cpu", "--preset", "LightningDiT-S/2", "--depth", "1", "--batch", "2", "--latent-size", "4",
            "--repeats", "1", "--warmup", "0", "--sample-steps", "2", "--sample-batch", "2"]  # fmt: skip


def test_bench_dit_times_ours_alone():
    results = _load("bench_dit").main(TINY_DIT)
    assert results["train_step_s_ours"] > 0 and results["sample_images_per_s_ours"] > 0
    assert "train_speedup" not in results


def test_bench_dit_alternates_with_a_reference_checkout(tmp_path, monkeypatch):
    # A stand-in checkout: models/lightningdit.py with the reference's constructor keywords and
    # forward_with_cfg, built on our model (the real one needs the hustvl/LightningDiT sources).
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    (tmp_path / "models" / "lightningdit.py").write_text(textwrap.dedent('''
        import torch
        from aligntok.models.lightningdit import LightningDiT as Ours, LightningDiTConfig

        class LightningDiT(Ours):
            def __init__(self, **kwargs):
                super().__init__(LightningDiTConfig(**kwargs))

            def forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval=None, cfg_interval_start=None):
                out = self.forward(x, t, y)
                cond, uncond = out.chunk(2)
                guided = uncond + cfg_scale * (cond - uncond) if not (cfg_interval and t[0] < cfg_interval_start) else cond
                return torch.cat([guided, guided])
    '''))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    monkeypatch.delitem(sys.modules, "models.lightningdit", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_reference prepends the checkout
    results = _load("bench_dit").main([*TINY_DIT, "--reference-repo", str(tmp_path), "--profile"])
    assert results["train_speedup"] > 0 and results["sample_speedup"] > 0
    # the profiled share of matmul / SDPA time is a real fraction of each model's step
    assert 0 < results["shared_kernel_share_ours"] < 1 and 0 < results["shared_kernel_share_reference"] < 1


def test_bench_tokenizer_measures_both_models_in_and_out_of_process():
    bench = _load("bench_tokenizer")
    for name in bench.MODELS:
        for op in ("encode", "decode"):
            row = bench.measure(name, op, 32, 1, "cpu", "fp32", 1, tiny=True)
            assert row["seconds"] > 0 and row["peak_bytes"] >= 0 and row["weight_bytes"] > 0
    args = bench.build_parser().parse_args(["--tiny", "--sizes", "32", "--repeats", "1", "--device", "cpu"])
    assert bench.run_isolated(args, "aligntok", "decode", 32)["size"] == 32
    with pytest.raises(ValueError, match="unknown model"):
        bench.build("nope", tiny=True)


def test_gpu_check_smoke_prints_one_table():
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--smoke"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert any("MFU" in line for line in table) and any("tokenizer decode" in line for line in table)
    assert len(table) >= 10


TINY_CACHE = ["--images", "6", "--resolution", "32", "--jpeg-size", "48", "40", "--batch-size", "2", "--shard-size", "4",
              "--repeats", "1"]  # fmt: skip


def test_bench_cache_latents_runs_a_table_row_and_profiles_the_tars():
    bench = _load("bench_cache_latents")
    # One row in subprocesses (the model anchor, the data path alone, the cache call), 1 process, 1 worker.
    rows = bench.main([*TINY_CACHE, "--data-kinds", "jpeg", "--procs", "1", "--workers", "1"])
    assert [(row["data"], row["procs"], row["workers"]) for row in rows] == [("jpeg", 1, 1)]
    assert all(rows[0][key] > 0 for key in ("data_images_per_s", "call_images_per_s", "command_images_per_s",
                                              "model_images_per_s"))
    # In process: the tars written from the JPEG folder go through cache-latents under cProfile.
    phases = bench.main([*TINY_CACHE, "--data-kinds", "tars", "--workers", "0", "--profile", "--profile-top", "3"])
    assert phases["total"] > 0 and phases["encode"] > 0 and phases["load (tars)"] > 0 and phases["write"] > 0
