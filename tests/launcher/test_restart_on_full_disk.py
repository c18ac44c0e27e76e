"""A restart on a full log disk starts the instance: the line that marks the restart in its log could not be
written (ENOSPC), and each restart failed on it until serve gave up and stopped every instance, though the
instance itself needs no room to serve (serve says that the log directory is full: launcher/log_space.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.process import ChildProcess

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
FULL = Path("/dev/full")  # every write: ENOSPC


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full (Linux)")
def test_a_restart_whose_log_note_cannot_be_written_still_starts_and_stops_cleanly() -> None:
    child = ChildProcess("decode-0", SLEEPER, FULL)
    child.start(note="restart 1 of decode-0 (was killed by signal 9 (SIGKILL))")
    try:
        assert child.running
    finally:
        child.stop(5.0)  # closing the log raised nothing either
    assert not child.running


def test_a_log_that_cannot_be_opened_is_still_an_error_naming_log_dir(tmp_path: Path) -> None:
    (tmp_path / "decode-0.log").mkdir()  # a directory in the log file's place
    child = ChildProcess("decode-0", SLEEPER, tmp_path / "decode-0.log")
    with pytest.raises(PdlaunchError) as refused:
        child.start(note="restart 1")
    assert refused.value.field == "log_dir" and "cannot write decode-0's log" in refused.value.message
