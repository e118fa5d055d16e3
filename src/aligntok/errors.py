"""The exceptions the CLI prints as one line: the user's input or config is wrong (``USER_ERRORS``, exit 2),
or the machine failed under the run (``ENVIRONMENT_ERRORS``, exit 1)."""

from __future__ import annotations

from safetensors import SafetensorError

from aligntok.config import ConfigError


class TrainingAborted(RuntimeError):
    """A run stopped on purpose (e.g. too many non-finite steps); its last good checkpoint is intact."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ValueError, FileNotFoundError, TrainingAborted)


#: "The machine failed under the run": storage (ENOSPC, EIO, EACCES), vanished files, network. A full
#: disk under safetensors' writer raises its own error type, not OSError.
ENVIRONMENT_ERRORS: tuple[type[BaseException], ...] = (OSError, SafetensorError)


def first_line(exc: BaseException) -> str:
    """An exception's message as one line: its first, or for an error re-raised from a DataLoader worker
    (whose message is the worker's traceback) the original error, the traceback's last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 2 and lines[1].startswith("Original Traceback"):
        return lines[-1]
    return lines[0]
