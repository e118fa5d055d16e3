"""File-system helpers shared by everything that writes files other processes or later runs read.

Every file aligntok writes for later use goes through a uniquely named sibling and a rename
(:func:`replace_atomically`), so a kill or a full disk mid-write leaves the previous version (or
nothing), never half a file; the sibling is removed when the write fails. Storage failures surface as
:class:`OSError` (safetensors' own error type included), which the CLI reports in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any


def _process_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; done once, at import
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_process_umask()  # what open() would give; mkstemp's files are private (0600)
_DIR_MODE = 0o777 & ~_process_umask()  # what mkdir() would give; mkdtemp's directories are private (0700)


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(staging)`` on a uniquely named sibling of ``path``, fsync it, rename it over ``path``.

    A reader never sees half a file, concurrent writers never share a staging file, and a failure
    (a full disk, a kill) leaves ``path`` as it was; the staging file is removed unless the process dies.
    Creates the parent directory. Staging files are named ``.NAME.*.tmp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        os.chmod(staging, _FILE_MODE)
        write(Path(staging))
        with open(staging, "rb") as written:  # durable before it is visible under its name
            os.fsync(written.fileno())
        os.replace(staging, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staging)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`replace_atomically`."""

    def write(staging: Path) -> None:
        with open(staging, "w", encoding="utf-8") as file:
            file.write(text)

    return replace_atomically(path, write)


def save_safetensors(
    tensors: Mapping[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` through :func:`replace_atomically`; its I/O errors as OSError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(staging: Path) -> None:
        try:
            save_file(dict(tensors), str(staging), metadata=metadata)
        except SafetensorError as e:  # e.g. "I/O error: No space left on device (os error 28)"
            raise OSError(f"cannot write {path}: {e}") from None
        os.chmod(staging, _FILE_MODE)  # safetensors writes a fresh, private file

    return replace_atomically(path, write)


def write_directory_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` in a sibling temporary directory, then rename it into ``target``.

    A reader never sees a half-written directory, and a failure leaves ``target`` as it was.
    An existing ``target`` is replaced (moved aside first, then removed).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(staging)
        # readable as anything else the user writes (mkdtemp and some writers make private files)
        for folder, _, files in os.walk(staging):
            os.chmod(folder, _DIR_MODE)
            for name in files:
                os.chmod(os.path.join(folder, name), _FILE_MODE)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(retired / target.name, target)  # put the old one back rather than lose it
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Within the block, a corrupt or truncated ``path`` (a safetensors header or JSON that does not parse) is a
    one-line ValueError naming the file: a re-run cannot mend it, unlike the storage errors the CLI reports."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is corrupt or truncated ({e}); restore or re-create it") from None


def read_json_document(path: Path, format_name: str, what: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object in ``path`` whose ``format`` field is ``format_name`` and which has every key in
    ``required``. Raises a one-line ValueError naming ``what`` (e.g. "a LightningDiT config") otherwise."""
    try:
        document = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(document, dict) or document.get("format") != format_name or any(k not in document for k in required):
        found = document.get("format") if isinstance(document, dict) else None
        raise ValueError(f"{path} is not {what} (format={found!r}, expected {format_name!r})")
    return document
