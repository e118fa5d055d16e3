"""Atomic writers: a failed write (full disk, kill) leaves the previous file and no staging file behind."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from aligntok.io import replace_atomically, write_directory_atomically, write_text_atomically


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_write_that_fails_midway_keeps_the_previous_file_and_no_staging_file(tmp_path):
    path = write_text_atomically(tmp_path / "result.json", "old\n")

    def half_then_full(staging):
        staging.write_text("new, but only ha")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging))

    with pytest.raises(OSError, match="No space left"):
        replace_atomically(path, half_then_full)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_files_get_the_permissions_open_would_give_them(tmp_path):
    path = write_text_atomically(tmp_path / "sub" / "x.txt", "x")  # parents made as needed
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


def test_directories_written_atomically_get_the_permissions_mkdir_and_open_would_give(tmp_path):
    def write(staging):
        (staging / "sub").mkdir()
        private = staging / "sub" / "model.safetensors"
        private.write_bytes(b"x")
        os.chmod(private, 0o600)  # as a writer that stages through mkstemp leaves it

    target = write_directory_atomically(tmp_path / "model", write)
    umask = _umask()
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((target / "sub").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((target / "sub" / "model.safetensors").stat().st_mode) == 0o666 & ~umask
