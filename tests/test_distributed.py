"""One code path for one process and torchrun: helpers without a process group, and two Gloo ranks
(replicated with the coalesced all-reduce, and FSDP2) matching one process on the same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aligntok.training import distributed

_spec = importlib.util.spec_from_file_location("engine_toys", Path(__file__).with_name("test_trainer.py"))
toys = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toys)

STEPS = 5
NAN_STEP = 2  # the two-rank runs inject it on rank 1 only: both ranks must skip it


def test_without_torchrun_everything_is_a_single_process_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert not distributed.is_distributed() and distributed.is_main()
    t = torch.tensor([1.0, 3.0])
    assert distributed.all_reduce_mean(t) is t and t.tolist() == [1.0, 3.0]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.gather_objects("x") == ["x"]
    info.barrier()
    distributed.barrier()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        distributed.init_distributed()


def test_gradient_buckets_respect_dtype_and_size(monkeypatch):
    monkeypatch.setattr(distributed, "GRAD_BUCKET_BYTES", 64)
    tensors = [torch.zeros(8), torch.zeros(8), torch.zeros(4, dtype=torch.float64), torch.zeros(100)]
    sizes = [[t.numel() for t in bucket] for bucket in distributed._buckets(tensors)]
    assert sizes == [[8, 8], [4], [100]]


TWO_RANKS = textwrap.dedent(
    """
    import importlib.util, json, sys
    from pathlib import Path
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    from aligntok.training.distributed import destroy_distributed, init_distributed

    spec = importlib.util.spec_from_file_location("engine_toys", sys.argv[2])
    toys = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toys)
    out, steps, nan_step = Path(sys.argv[1]), int(sys.argv[3]), int(sys.argv[4])
    dist = init_distributed()

    def make(mode, stop_at=None):
        task = toys.ToyTask(noise=False, blocks=2, nan_steps=(nan_step,) if dist.rank == 1 else ())
        loader = toys.toy_loader(8, rank=dist.rank, world_size=dist.world_size, stop_at=stop_at)
        return toys.toy_trainer(out / mode, task=task, loader=loader, dist=dist, fsdp=mode == "fsdp",
                                steps=steps, ckpt_every=3)

    def run(mode):  # trainers live in this frame, gone before the process group is destroyed
        if mode == "fsdp":  # also exercise a sharded save and load: crash after step 4, resume
            try:
                make(mode, stop_at=4).fit()
            except toys.Interrupted:
                pass
        trainer = make(mode)
        result = trainer.fit()
        weights = {}
        for name, module in trainer.modules.items():
            for key, value in module.state_dict().items():
                weights[f"{name}.{key}"] = value.full_tensor() if isinstance(value, DTensor) else value
        with trainer.ema_weights():
            swapped = trainer.modules["gen"].state_dict()
            weights.update({f"swapped_ema.{k}": (v.full_tensor() if isinstance(v, DTensor) else v).clone()
                            for k, v in swapped.items()})
        rank_file = out / mode / f"rank{dist.rank}.safetensors"
        save_file({k: v.detach().clone() for k, v in weights.items()}, str(rank_file))
        (out / mode / f"result{dist.rank}.json").write_text(json.dumps(
            {"step": result.step, "nonfinite": result.nonfinite_steps, "resumed_from": result.resumed_from,
             "sharded": isinstance(next(trainer.modules["gen"].parameters()), DTensor)}))

    for mode in ("replicated", "fsdp"):
        run(mode)
    destroy_distributed()
    """
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the same global batch (8) and the same step (2) poisoned."""
    out = tmp_path_factory.mktemp("one_process")
    task = toys.ToyTask(noise=False, blocks=2, nan_steps=(NAN_STEP,))
    trainer = toys.toy_trainer(out, task=task, steps=STEPS, ckpt_every=3)
    result = trainer.fit()
    assert result.nonfinite_steps == 1
    return out / "checkpoints" / f"step_{STEPS:08d}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    script = out / "two_ranks.py"
    script.write_text(TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(out),
        str(Path(__file__).with_name("test_trainer.py")),
        str(STEPS),
        str(NAN_STEP),
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    if run.returncode != 0:
        pytest.fail(f"torchrun failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}")
    return out


def _assert_close_states(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_two_ranks_train_like_one_process_with_the_same_global_batch(reference, two_ranks, mode):
    run = two_ranks / mode
    results = [json.loads((run / f"result{r}.json").read_text()) for r in (0, 1)]
    # A NaN on rank 1 alone made both ranks skip the step.
    assert all(r["step"] == STEPS and r["nonfinite"] == 1 for r in results)
    assert all(r["sharded"] == (mode == "fsdp") for r in results)
    if mode == "fsdp":
        assert all(r["resumed_from"] == 3 for r in results)
    saved = run / "checkpoints" / f"step_{STEPS:08d}"
    for name in ("model_gen", "model_disc", "ema_gen"):
        _assert_close_states(
            load_file(str(saved / f"{name}.safetensors")), load_file(str(reference / f"{name}.safetensors"))
        )
    for name in ("generator", "discriminator"):
        got = torch.load(saved / f"optimizer_{name}.pt", weights_only=True)["state"]
        want = torch.load(reference / f"optimizer_{name}.pt", weights_only=True)["state"]
        assert got.keys() == want.keys()
        for index in want:
            _assert_close_states(got[index], want[index])
    ranks = [load_file(str(run / f"rank{r}.safetensors")) for r in (0, 1)]
    _assert_close_states(ranks[1], ranks[0])  # the replicas (or the gathered shards) agree
    ema = load_file(str(saved / "ema_gen.safetensors"))
    _assert_close_states(
        {k.removeprefix("swapped_ema."): v for k, v in ranks[0].items() if k.startswith("swapped_ema.")}, ema
    )
    assert {p.name for p in saved.iterdir()} >= {"rng_rank0.pt", "rng_rank1.pt"}
