"""The `aligntok` command: subcommands listed, one-line errors, reconstruct writes PNG pairs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aligntok.cli import main
from aligntok.errors import first_line
from aligntok.models.tokenizer import AlignTokTokenizer, TokenizerConfig

TINY = Path(__file__).resolve().parents[1] / "configs" / "tokenizer" / "tiny.yaml"


def test_help_lists_the_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "aligntok.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("train-tokenizer", "reconstruct"):
        assert command in out


@pytest.mark.parametrize(
    "override, expected",
    [("stage1.train.stepz=3", "unknown config key 'stage1.train.stepz'"), ("data.resolution=big", "data.resolution")],
)
def test_bad_config_is_one_line_and_exit_code_2(tmp_path, capsys, override, expected):
    assert main(["train-tokenizer", str(TINY), "--out", str(tmp_path / "run"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err


def test_reconstruct_writes_input_and_reconstruction_pairs(tmp_path, capsys):
    cfg = TokenizerConfig(encoder="random", latent_channels=4, adapter_hidden=8)
    cfg.decoder.base_channels, cfg.decoder.channel_mult, cfg.decoder.norm_groups = 8, [1, 2], 4
    AlignTokTokenizer.from_config(cfg).save_pretrained(tmp_path / "tok")
    out = tmp_path / "recon"
    args = ["reconstruct", str(tmp_path / "tok"), "builtin:shapes", "--out", str(out), "--num", "3", "--resolution", "16"]
    assert main(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:05d}_{kind}.png" for i in range(3) for kind in ("input", "recon")]
    for name in names:
        image = np.asarray(Image.open(out / name))
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8


def _tiny_tokenizer(directory: Path) -> Path:
    cfg = TokenizerConfig(encoder="random", latent_channels=4, adapter_hidden=8)
    cfg.decoder.base_channels, cfg.decoder.channel_mult, cfg.decoder.norm_groups = 8, [1, 2], 4
    AlignTokTokenizer.from_config(cfg).save_pretrained(directory)
    return directory


def test_a_corrupt_weights_or_config_file_is_named_in_one_line_without_promising_a_rerun(tmp_path, capsys):
    tok = _tiny_tokenizer(tmp_path / "tok")
    weights = tok / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["reconstruct", str(tok), "builtin:shapes", "--out", str(tmp_path / "o"), "--resolution", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(weights) in err and "corrupt or truncated" in err and "re-run" not in err and "\n" not in err
    _tiny_tokenizer(tmp_path / "tok2")
    (tmp_path / "tok2" / "config.json").write_text('{"format": "aligntok-tok')
    assert main(["reconstruct", str(tmp_path / "tok2"), "builtin:shapes", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path / "tok2" / "config.json") in err and "corrupt or truncated" in err and "\n" not in err


def test_bad_input_found_in_a_loader_worker_is_one_line(tmp_path, capsys):
    tok = _tiny_tokenizer(tmp_path / "tok")
    images = tmp_path / "allbad"
    images.mkdir()
    for name in ("a.png", "b.png"):
        (images / name).write_bytes(b"\x89PNG not really")
    args = ["cache-latents", "--tokenizer", str(tok), "--data", str(images), "--resolution", "16",
            "--num-workers", "1", "--out", str(tmp_path / "cache")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()  # the progress bar's line, then the error's
    assert "Traceback" not in err and err.splitlines()[-1].startswith("aligntok cache-latents: error: ")
    assert "images in" in err.splitlines()[-1] and "unreadable" in err.splitlines()[-1]


def test_reconstruct_writes_each_readable_image_once_and_names_the_unreadable(tmp_path, capsys):
    tok = _tiny_tokenizer(tmp_path / "tok")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "recon"
    out.mkdir()
    for stale in ("00007_input.png", "00007_recon.png"):  # a previous run's pair beyond this one's
        (out / stale).write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    assert main(["reconstruct", str(tok), str(folder), "--out", str(out), "--num", "30", "--resolution", "16"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 input/reconstruction pairs" in printed and "1 unreadable images skipped" in printed and "3.png" in printed
    inputs = [np.asarray(Image.open(out / f"{i:05d}_input.png")) for i in range(3)]
    assert len({a.tobytes() for a in inputs}) == 3  # no image twice
    assert sorted(p.name for p in out.iterdir()) == [*(f"{i:05d}_{k}.png" for i in range(3) for k in ("input", "recon")), "notes.txt"]
    # the same for WebDataset shards: at most what they hold
    from aligntok.data import ShapesDataset, write_shards

    source = ShapesDataset(5, 16, seed=1)
    write_shards([source[i] for i in range(5)], str(tmp_path / "shards" / "%06d.tar"), 10)
    args = ["reconstruct", str(tok), str(tmp_path / "shards" / "000000.tar"), "--num", "10", "--resolution", "16",
            "--out", str(tmp_path / "from-shards")]
    assert main(args) == 0 and len(list((tmp_path / "from-shards").iterdir())) == 10


def test_reconstruct_of_a_missing_tokenizer_is_one_line(tmp_path, capsys):
    assert main(["reconstruct", str(tmp_path / "nope"), "builtin:shapes", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "\n" not in err


@pytest.mark.parametrize(
    "failure, code, expected",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/model.safetensors"), 1, "No space left on device"),
        (OSError(errno.EIO, os.strerror(errno.EIO)), 1, "Input/output error"),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/runs/x"), 1, "once the output is writable"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), "/runs/x"), 1, "once the output is writable"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_the_machine_failing_under_a_command_is_one_line_saying_a_rerun_finishes(
    tmp_path, capsys, monkeypatch, failure, code, expected
):
    import aligntok.inference

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(aligntok.inference, "reconstruct_to_pngs", fail)
    assert main(["reconstruct", "tok", "builtin:shapes", "--out", str(tmp_path / "o")]) == code
    err = capsys.readouterr().err.strip()
    assert expected in err and "re-run the same command" in err and "\n" not in err and "Traceback" not in err


def test_an_interrupt_turned_into_a_writers_error_is_still_an_interrupt(tmp_path, capsys, monkeypatch):
    import aligntok.inference

    def interrupted_write(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:  # what torch.save's zip writer does on its way out
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9853568 vs 9853460") from None

    monkeypatch.setattr(aligntok.inference, "reconstruct_to_pngs", interrupted_write)
    assert main(["reconstruct", "tok", "builtin:shapes", "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err.strip()
    assert "interrupted" in err and "re-run the same command" in err and "\n" not in err
    monkeypatch.setattr(aligntok.inference, "reconstruct_to_pngs", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug stays a traceback
        main(["reconstruct", "tok", "builtin:shapes", "--out", str(tmp_path / "o")])


class _UnreadableDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/data/shard-00000.safetensors")


def test_an_error_from_a_loader_worker_is_named_by_its_original_line():
    with pytest.raises(OSError) as caught:  # torch re-raises it in the main process with the worker's traceback
        next(iter(torch.utils.data.DataLoader(_UnreadableDataset(), num_workers=1)))
    assert first_line(caught.value) == "OSError: [Errno 5] Input/output error: '/data/shard-00000.safetensors'"
    assert first_line(ValueError("one\ntwo")) == "one" and first_line(OSError()) == "OSError"
