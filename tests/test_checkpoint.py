"""Checkpoints: layout, manifest-last completeness, atomicity under SIGKILL, pruning, RNG round trip."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aligntok.training import checkpoint as ckpt

_spec = importlib.util.spec_from_file_location("engine_toys", Path(__file__).with_name("test_trainer.py"))
toys = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toys)


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_holds_every_piece_of_state_and_a_manifest_written_last(tmp_path):
    trainer = toys.toy_trainer(tmp_path, steps=2, ckpt_every=2)
    trainer.fit()
    path = tmp_path / "checkpoints" / "step_00000002"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == path.name
    names = {p.name for p in path.iterdir()}
    assert names == {
        "model_gen.safetensors",
        "model_disc.safetensors",
        "ema_gen.safetensors",
        "optimizer_generator.pt",
        "optimizer_discriminator.pt",
        "scheduler_generator.pt",
        "scheduler_discriminator.pt",
        "rng_rank0.pt",
        "trainer_state.json",
        "config.yaml",
        "MANIFEST.json",
    }
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert manifest["step"] == 2 and set(manifest["files"]) == names - {"MANIFEST.json"}
    assert all((path / n).stat().st_size == size for n, size in manifest["files"].items())
    # The manifest is the last file written (its mtime is not older than any other file's).
    assert all(os.stat(path / n).st_mtime_ns <= os.stat(path / "MANIFEST.json").st_mtime_ns for n in names)
    assert _equal_states(load_file(str(path / "model_gen.safetensors")), trainer.modules["gen"].state_dict())
    assert _equal_states(load_file(str(path / "ema_gen.safetensors")), trainer.ema_state_dict("gen"))
    optimizer = torch.load(path / "optimizer_generator.pt", weights_only=True)
    assert int(optimizer["state"][0]["step"]) == 2
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == state["data_position"] == 2 and state["ema_updates"] == {"gen": 2}
    assert "steps: 2" in (path / "config.yaml").read_text()


def test_a_partial_or_corrupt_checkpoint_directory_is_never_loaded(tmp_path):
    toys.toy_trainer(tmp_path, steps=2, ckpt_every=2).fit()
    root = tmp_path / "checkpoints"
    no_manifest = root / "step_00000005"
    shutil.copytree(root / "step_00000002", no_manifest)
    (no_manifest / "MANIFEST.json").unlink()
    truncated = root / "step_00000004"
    shutil.copytree(root / "step_00000002", truncated)
    model = truncated / "model_gen.safetensors"
    model.write_bytes(model.read_bytes()[:-10])
    bad_json = root / "step_00000003"
    shutil.copytree(root / "step_00000002", bad_json)
    (bad_json / "MANIFEST.json").write_text("{not json")

    assert not ckpt.is_complete(no_manifest) and not ckpt.is_complete(truncated)
    assert ckpt.latest_checkpoint(tmp_path) == root / "step_00000002"
    result = toys.toy_trainer(tmp_path, steps=3, ckpt_every=2).fit()
    assert result.resumed_from == 2 and result.step == 3


def test_only_the_newest_keep_last_checkpoints_stay_and_stale_temp_dirs_go(tmp_path):
    stale = tmp_path / "checkpoints" / ".tmp_step_00000099"
    stale.mkdir(parents=True)
    (stale / "model_gen.safetensors").write_bytes(b"half")
    result = toys.toy_trainer(tmp_path, steps=5, ckpt_every=1, keep_last=2).fit()
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step_00000004",
        "step_00000005",
    ]
    assert result.checkpoint == tmp_path / "checkpoints" / "step_00000005"


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    device = torch.device("cpu")
    ckpt.seed_everything(123)
    torch.rand(3), np.random.rand(3), random.random(), np.random.randn()  # advance every generator
    ckpt.save_state(ckpt.capture_rng_state(device), tmp_path / "rng.pt")
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn(3))
    ckpt.seed_everything(999)
    ckpt.restore_rng_state(ckpt.load_state(tmp_path / "rng.pt"), device)
    actual = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn(3))
    assert torch.equal(expected[0], actual[0]) and np.array_equal(expected[1], actual[1])
    assert expected[2] == actual[2] and np.array_equal(expected[3], actual[3])


def test_load_module_weights_reads_the_newest_checkpoint_or_says_there_is_none(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under"):
        ckpt.load_module_weights(tmp_path, "gen", toys.ToyTask().gen)
    trainer = toys.toy_trainer(tmp_path, steps=3, ckpt_every=2)
    trainer.fit()
    fresh = toys.ToyTask(seed=5)
    used = ckpt.load_module_weights(tmp_path, "gen", fresh.gen)
    assert used.name == "step_00000003"
    assert _equal_states(fresh.gen.state_dict(), trainer.modules["gen"].state_dict())
    ckpt.load_module_weights(tmp_path, "gen", fresh.gen, ema=True)
    assert _equal_states(fresh.gen.state_dict(), trainer.ema_state_dict("gen"))
    with pytest.raises(ValueError, match=r"does not fit module 'disc' .*missing keys: blocks\.1\.bias, blocks\.1\.weight"):
        ckpt.load_module_weights(tmp_path, "disc", toys.ToyTask(blocks=2).disc)


KILLED_RUN = textwrap.dedent(
    """
    import importlib.util, sys, time
    from pathlib import Path
    import aligntok.training.checkpoint as ckpt

    spec = importlib.util.spec_from_file_location("engine_toys", sys.argv[2])
    toys = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toys)
    write = ckpt.save_tensors

    def slow_write(tensors, path):
        if "step_00000004" in str(path):
            time.sleep(120)  # the test kills the process during this write
        write(tensors, path)

    ckpt.save_tensors = slow_write
    toys.toy_trainer(Path(sys.argv[1]), steps=6, ckpt_every=2).fit()
    """
)


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), str(Path(__file__).with_name("test_trainer.py"))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    temp = out / "checkpoints" / ".tmp_step_00000004"
    try:
        deadline = time.monotonic() + 90
        while not (temp / "rng_rank0.pt").exists():  # mid-write: some files there, the rest pending
            if proc.poll() is not None:
                pytest.fail(f"training script exited early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the checkpoint write at step 4 never started")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()

    assert proc.returncode == -signal.SIGKILL
    assert temp.is_dir() and not (temp / "MANIFEST.json").exists()
    assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step_00000002"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"

    resumed = toys.toy_trainer(out, steps=6, ckpt_every=2)
    result = resumed.fit()
    assert result.resumed_from == 2 and result.step == 6 and not temp.exists()
    straight = toys.toy_trainer(tmp_path / "straight", steps=6, ckpt_every=2)
    straight.fit()
    expected, actual = toys.full_state(straight), toys.full_state(resumed)
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_a_rerun_finishes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = ckpt.save_tensors

    def disk_full_at_step_4(tensors, path):
        if path.parent.name == ".tmp_step_00000004":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(tensors, path)

    monkeypatch.setattr(ckpt, "save_tensors", disk_full_at_step_4)
    with pytest.raises(OSError, match="No space left"):
        toys.toy_trainer(out, steps=6, ckpt_every=2).fit()
    root = out / "checkpoints"
    assert ckpt.latest_checkpoint(out) == root / "step_00000002"
    assert not list(root.glob(".tmp_*"))  # the partial write is gone: its space is given back
    monkeypatch.undo()

    resumed = toys.toy_trainer(out, steps=6, ckpt_every=2)
    result = resumed.fit()
    assert result.resumed_from == 2 and result.step == 6
    straight = toys.toy_trainer(tmp_path / "straight", steps=6, ckpt_every=2)
    straight.fit()
    expected, actual = toys.full_state(straight), toys.full_state(resumed)
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []
