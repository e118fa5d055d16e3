"""Progress bars that suit where they are written: live on a terminal, a few lines in a log file.

Every progress bar of aligntok comes from :func:`progress_bar`. On a terminal it is tqdm's usual bar.
Written to a file or a pipe (a log of ``aligntok demo > log.txt``, a batch job's output), each refresh
is another record, so refreshing ten times a second turns a 4-minute run into thousands of lines;
there it refreshes at most every :data:`LOG_INTERVAL_S` seconds (plus its first and last state).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm.auto import tqdm

#: Seconds between refreshes of a bar that is not written to a terminal.
LOG_INTERVAL_S = 30.0


def is_terminal(stream: IO[str] | None) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and captured streams)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed stream
        return False


def progress_bar(iterable: Iterable[Any] | None = None, *, file: IO[str] | None = None, **options: Any) -> tqdm:
    """A tqdm bar on ``file`` (default: stderr) that refreshes every :data:`LOG_INTERVAL_S` s off a terminal.

    ``options`` are tqdm's (``total``, ``desc``, ``unit``, ``disable``, ...); an explicit
    ``mininterval`` wins.
    """
    file = sys.stderr if file is None else file
    if not is_terminal(file):
        options.setdefault("mininterval", LOG_INTERVAL_S)
        options["dynamic_ncols"] = False  # no terminal to measure
    return tqdm(iterable, file=file, **options)
