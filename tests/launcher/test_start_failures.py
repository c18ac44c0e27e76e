"""`pdlaunch serve` when its own files cannot be written (a log file or deployment.json that is a directory,
or belongs to another user): exit 1 naming log_dir, no traceback, and every child started before is reaped."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.log_dir_lock import log_dir_holder
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.launcher.process import ChildProcess
from tests.config.cli_helpers import invoke
from tests.serving.e2e import alive, children_of


def test_a_log_file_that_cannot_be_opened_is_an_error_naming_log_dir(tmp_path: Path) -> None:
    (tmp_path / "x.log").mkdir()
    child = ChildProcess("x", [sys.executable, "-c", "pass"], tmp_path / "x.log")
    with pytest.raises(PdlaunchError) as caught:
        child.start()
    assert caught.value.field == "log_dir"
    assert "x.log" in caught.value.message and child.pid is None


def test_a_program_that_cannot_be_started_is_an_error_naming_it(tmp_path: Path) -> None:
    child = ChildProcess("x", [str(tmp_path / "no-such-program")], tmp_path / "x.log")
    with pytest.raises(PdlaunchError) as caught:
        child.start()
    assert "no-such-program" in caught.value.message and child.pid is None


@pytest.mark.parametrize("blocked", ["deployment.json", "decode-0.log"])
def test_serve_stops_cleanly_when_a_file_in_log_dir_cannot_be_written(tmp_path: Path, blocked: str) -> None:
    log_dir = tmp_path / "logs"
    (log_dir / blocked).mkdir(parents=True)  # decode-0.log: prefill-0 has been started already
    port = PortAllocator("127.0.0.1").free("test proxy")
    result = invoke(["serve", "tiny", "--device", "cpu", "--port", str(port), "--log-dir", str(log_dir)])
    assert result.exit_code == 1, result.output
    assert "error: --log-dir:" in result.output and blocked in result.output, result.output
    assert alive(children_of(os.getpid())) == []
    assert log_dir_holder(log_dir) is None
