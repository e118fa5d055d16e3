"""Progress bars: live on a terminal, a few refreshes in a file or pipe; one helper used everywhere."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

from aligntok.progress import LOG_INTERVAL_S, progress_bar
from aligntok.training.logging import RunLogger


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_off_a_terminal_refreshes_at_the_log_interval_and_on_one_stays_live():
    logged, live = io.StringIO(), _Terminal()
    assert progress_bar(total=1, file=logged).mininterval == LOG_INTERVAL_S >= 30
    assert progress_bar(total=1, file=live).mininterval < 1
    assert progress_bar(total=1, file=logged, mininterval=5).mininterval == 5


def test_the_training_bar_written_to_a_pipe_is_not_one_line_per_step(tmp_path, capsys):
    logger = RunLogger(tmp_path, enabled=True, total_steps=40, start_step=0)
    for step in range(1, 41):  # 0.4 s of steps: tqdm's default (0.1 s) would refresh ~4 more times
        time.sleep(0.01)
        logger.progress(step, {"loss": 1.0})
    logger.close()
    written = capsys.readouterr().err
    assert written.count("\r") <= 2, written  # the first state and the last


def test_every_progress_bar_comes_from_the_one_helper():
    source = Path(__file__).resolve().parents[1] / "src" / "aligntok"
    direct = [str(path.relative_to(source)) for path in source.rglob("*.py")
              if path.name != "progress.py" and re.search(r"\btqdm\(", path.read_text())]
    assert direct == []
