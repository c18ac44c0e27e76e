"""A child killed by a SIGKILL the launcher did not send (the kernel's OOM killer, most often) is said so, with where
to look; serve's line read only `decode-1 (pid N) was killed by signal 9 (SIGKILL)`, the same as for the SIGKILL
the launcher sends a stalled or stuck instance itself."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from pdlaunch.launcher.process import OUTSIDE_SIGKILL, ChildProcess
from pdlaunch.launcher.readiness import ChildExited
from pdlaunch.launcher.supervisor import SupervisionFailed
from tests.serving.test_fault_tolerance_supervisor import supervised_pd

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _ended(child: ChildProcess) -> int:
    assert child.wait(30.0), f"{child.name} did not end"
    code = child.poll()
    assert code is not None
    return code


def test_a_sigkill_from_outside_at_startup_names_the_oom_killer_and_where_to_look(tmp_path: Path) -> None:
    child = ChildProcess("decode-1", SLEEPER, tmp_path / "decode-1.log")
    child.start()
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    said = ChildExited(child, _ended(child)).message
    assert said == (f"decode-1 (pid {child.pid}) was killed by signal 9 (SIGKILL) (a SIGKILL pdlaunch did not send: "
                    "most often the kernel's OOM killer (`dmesg | grep -i oom` or `journalctl -k` names the process; "
                    "give it more memory, or run fewer or smaller instances on this machine), else someone's "
                    "`kill -9`)")


def test_the_launchers_own_sigkill_is_not_blamed_on_the_oom_killer(tmp_path: Path) -> None:
    child = ChildProcess("prefill-0", SLEEPER, tmp_path / "prefill-0.log")
    child.start()
    child.signal_group(signal.SIGKILL)
    code = _ended(child)
    assert child.outside_kill() is None
    assert ChildExited(child, code).message == f"prefill-0 (pid {child.pid}) was killed by signal 9 (SIGKILL)"
    child.start(note="restart 1")  # a restart that an outside SIGKILL ends is blamed again
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    _ended(child)
    assert child.outside_kill() == OUTSIDE_SIGKILL
    child.stop(1.0)


@pytest.mark.parametrize("restart", [True, False])
def test_serve_says_it_on_the_restart_line_and_when_it_gives_up(tmp_path: Path, restart: bool) -> None:
    with supervised_pd(tmp_path, restart) as (deployment, supervisor, console):
        decode = deployment.instances[1]
        decode.code = -9  # type: ignore[attr-defined]
        decode.outside_kill = lambda: OUTSIDE_SIGKILL  # type: ignore[method-assign]
        if restart:
            supervisor.tick(now=100.0)
            assert (f"[pdlaunch] decode-0 (pid 1000) was killed by signal 9 (SIGKILL); restart 1 in 1.0s "
                    f"({OUTSIDE_SIGKILL})") in console.export_text()
        else:
            with pytest.raises(SupervisionFailed) as failed:
                supervisor.tick(now=100.0)
            assert failed.value.message == (
                "decode-0 was killed by signal 9 (SIGKILL), and restarts are off for it (instances[1].restart: false); "
                f"it ended by {OUTSIDE_SIGKILL} (log: {tmp_path / 'decode-0.log'})")
