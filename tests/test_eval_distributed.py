"""ReconMetrics and FeatureStats combine exactly across torch.distributed ranks (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from aligntok.eval import FeatureStats, ModuleFeatures, ReconMetrics

WORLD_SIZE = 2


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    originals = torch.randint(0, 256, (10, 3, 16, 16), generator=g, dtype=torch.uint8)
    noise = torch.randint(-20, 21, originals.shape, generator=g)
    reconstructions = (originals.int() + noise).clamp(0, 255).to(torch.uint8)
    features = torch.randn(10, 6, generator=g, dtype=torch.float64) * 3 + 100
    return originals, reconstructions, features


def _feature_net() -> ModuleFeatures:
    torch.manual_seed(0)
    return ModuleFeatures(nn.Conv2d(3, 4, 3, stride=2), name="tiny")


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        originals, reconstructions, features = _data()
        mine = slice(0, 3) if rank == 0 else slice(3, 10)  # uneven shards
        metrics = ReconMetrics(inception=_feature_net())
        metrics.update(originals[mine], reconstructions[mine])
        result = metrics.compute()
        stats = FeatureStats()
        stats.update(features[mine])
        combined = stats.across_ranks()
        result["mean"] = combined.mean.tolist()
        result["cov"] = combined.cov.tolist()
        result["count"] = combined.count
        result["local_count"] = stats.count
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_metrics_combine_across_ranks(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    originals, reconstructions, features = _data()
    single = ReconMetrics(inception=_feature_net())
    single.update(originals, reconstructions)
    expected = single.compute()
    whole = FeatureStats()
    whole.update(features)
    for rank in range(WORLD_SIZE):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["num_images"] == 10 and got["count"] == 10
        for key in ("psnr", "ssim", "rfid"):
            assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
        np.testing.assert_allclose(got["mean"], whole.mean, rtol=1e-14)
        np.testing.assert_allclose(got["cov"], whole.cov, rtol=1e-9, atol=1e-12)
    assert json.loads((tmp_path / "rank0.json").read_text())["local_count"] == 3  # the shard itself is untouched
