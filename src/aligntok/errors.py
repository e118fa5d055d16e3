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
    """An exception's message as one line (errors re-raised from DataLoader workers carry a traceback)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
