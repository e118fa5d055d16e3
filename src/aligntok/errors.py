"""The exceptions that mean "the user's input or config is wrong": the CLI prints them as one line."""

from __future__ import annotations

from aligntok.config import ConfigError


class TrainingAborted(RuntimeError):
    """A run stopped on purpose (e.g. too many non-finite steps); its last good checkpoint is intact."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ValueError, FileNotFoundError, TrainingAborted)
