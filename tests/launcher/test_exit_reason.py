"""Why an instance ended, in the launcher's own error line: an instance that cannot start logs `exiting: REASON`
as its last word, and serve said only `prefill-0 (pid N) exited with code 1; stopping the deployment`, the reason
five lines further down in the log's tail (a model directory that vanished between the check and the start)."""

from __future__ import annotations

import errno
import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from pdlaunch.launcher import process
from pdlaunch.launcher.process import ChildProcess
from pdlaunch.launcher.readiness import ChildExited
from pdlaunch.launcher.supervisor import SupervisionFailed
from tests.serving.test_fault_tolerance_supervisor import supervised_pd

REASON = ("engine failed to start: --model: model directory '/models/gone' does not exist (pass a local Hugging "
          "Face checkpoint directory ...)")


def _instance(tmp_path: Path, said: str, code: int) -> ChildProcess:
    script = ("import sys; print('INFO:     Started server process'); "
              f"print({said!r}); print('INFO:     Finished server process'); sys.exit({code})")
    return ChildProcess("prefill-0", [sys.executable, "-c", script], tmp_path / "prefill-0.log")


def _exited(child: ChildProcess) -> ChildExited:
    assert child.wait(30.0)
    code = child.poll()
    assert code is not None
    return ChildExited(child, code)


def test_the_instances_last_word_is_in_the_startup_error(tmp_path: Path) -> None:
    child = _instance(tmp_path, f"2026-11-30 09:23:07,417 ERROR prefill-0 pdlaunch.server: exiting: {REASON}", 1)
    child.start()
    assert _exited(child).message == f"prefill-0 (pid {child.pid}) exited with code 1: {REASON}"


def test_a_restart_is_not_blamed_on_what_the_run_before_it_said(tmp_path: Path) -> None:
    child = _instance(tmp_path, f"2026-11-30 09:23:07,417 ERROR prefill-0 pdlaunch.server: exiting: {REASON}", 1)
    child.start()
    _exited(child)
    child.argv = [sys.executable, "-c", "raise SystemExit(3)"]
    child.start(note="restart 1 of prefill-0 (exited with code 1)")
    assert _exited(child).message == f"prefill-0 (pid {child.pid}) exited with code 3"
    assert child.exit_reason() is None


@pytest.mark.parametrize("restart", [True, False])
def test_serve_says_it_on_the_restart_line_and_when_it_gives_up(tmp_path: Path, restart: bool) -> None:
    with supervised_pd(tmp_path, restart) as (deployment, supervisor, console):
        decode = deployment.instances[1]
        decode.code, decode.reason = 1, "engine loop failed: RuntimeError: boom"  # type: ignore[attr-defined]
        if restart:
            supervisor.tick(now=100.0)
            assert ("[pdlaunch] decode-0 (pid 1000) exited with code 1: engine loop failed: RuntimeError: boom; "
                    "restart 1 in 1.0s") in console.export_text()
        else:
            with pytest.raises(SupervisionFailed) as failed:
                supervisor.tick(now=100.0)
            assert failed.value.message.startswith(
                "decode-0 exited with code 1: engine loop failed: RuntimeError: boom, and restarts are off for it")


def test_a_restart_whose_mark_could_not_be_written_is_not_blamed_on_the_run_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a full log disk the restart's mark is not written (process.py goes on without it), and neither is anything
    the restarted run says: the last `exiting:` line in the log was the run before's, and serve's line blamed the
    restart's exit on it (`exited with code 3: engine failed to start: ... does not exist`)."""
    child = _instance(tmp_path, f"2026-11-30 09:23:07,417 ERROR prefill-0 pdlaunch.server: exiting: {REASON}", 1)
    child.start()
    _exited(child)

    class FullDisk(io.FileIO):
        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_full(path: Path, mode: str, buffering: int = -1) -> FullDisk:
        return FullDisk(path, mode)

    monkeypatch.setattr(process, "open", open_full, raising=False)  # the log opens; writing to it fails
    child.argv = [sys.executable, "-c", "raise SystemExit(3)"]
    child.start(note="restart 1 of prefill-0 (exited with code 1)")
    assert _exited(child).message == f"prefill-0 (pid {child.pid}) exited with code 3"
    assert child.exit_reason() is None
