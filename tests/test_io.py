"""Atomic writers: a failed write (full disk, kill) leaves the previous file and no staging file behind."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from aligntok.io import replace_atomically, write_text_atomically


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
