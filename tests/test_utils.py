"""utils: the progress display in a log that is not a terminal."""
from __future__ import annotations

import logging

from ddm_hpc import utils
from ddm_hpc.utils import LogProgress, progress


def test_a_non_terminal_log_gets_a_progress_line_per_interval(monkeypatch, caplog):
    """The trial's non-terminal log showed nothing for 25 min: now a line per interval, with the bar's postfix."""
    monkeypatch.delenv("DDM_PROGRESS", raising=False)
    monkeypatch.setenv("DDM_PROGRESS_EVERY", "0")  # a line after every item
    monkeypatch.setattr(utils.sys.stderr, "isatty", lambda: False, raising=False)
    bar = progress(range(4), "train")
    assert isinstance(bar, LogProgress) and bar.disable  # callers skip syncs made only for a bar's postfix
    with caplog.at_level(logging.INFO, logger="ddm_hpc.progress"):
        for i in bar:
            bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
    lines = [r.getMessage() for r in caplog.records if r.name == "ddm_hpc.progress"]
    assert len(lines) == 4 and lines[0].startswith("train: 1/4 (25%), 0 s, ~0 s left, loss=1.000"), lines
    assert lines[-1].startswith("train: 4/4 (100%)")


def test_progress_is_quiet_for_short_loops_and_when_off(monkeypatch, caplog):
    monkeypatch.delenv("DDM_PROGRESS", raising=False)
    monkeypatch.delenv("DDM_PROGRESS_EVERY", raising=False)
    monkeypatch.setattr(utils.sys.stderr, "isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="ddm_hpc.progress"):
        assert list(progress(iter(range(3)), "quick")) == [0, 1, 2]  # well under a minute: no line
        monkeypatch.setenv("DDM_PROGRESS_EVERY", "0")
        assert list(progress(range(3), "off", enable=False)) == [0, 1, 2]  # --no-progress
        monkeypatch.setenv("DDM_PROGRESS", "0")
        assert list(progress(range(3), "off")) == [0, 1, 2]  # the test suite's setting
    assert not [r for r in caplog.records if r.name == "ddm_hpc.progress"]
    monkeypatch.setenv("DDM_PROGRESS", "1")
    assert not getattr(progress(range(3), "bar"), "disable", True)  # a tqdm bar even off a terminal
