"""ChildProcess(parent_death_signal=...): the child gets the signal when the process that started it dies,
even by SIGKILL (prctl(PR_SET_PDEATHSIG), Linux). The SLURM backend relies on it: its srun steps must stop
when the launcher is killed (tests/cluster/test_slurm_stop.py has the real cluster's case)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pdlaunch.launcher.process import parent_death_hook
from tests.helpers.pids import signal_pid
from tests.serving.helpers import wait_for

# The launcher's stand-in: starts CHILD through a ChildProcess, prints its pid, then waits to be killed.
LAUNCHER = """\
import signal, sys, time
from pathlib import Path
from pdlaunch.launcher.process import ChildProcess
tmp = Path(sys.argv[1])
child = ChildProcess("child", [sys.executable, "-c", sys.argv[2], str(tmp)], tmp / "child.log",
                     parent_death_signal=signal.SIGUSR1)
child.start()
print(child.pid, flush=True)
time.sleep(600)
"""
# Writes `ready` once its SIGUSR1 handler is in place, `got SIGUSR1` when the signal comes.
CHILD = """\
import signal, sys, time
from pathlib import Path
tmp = Path(sys.argv[1])
def on_usr1(*_):
    (tmp / "got").write_text("SIGUSR1")
    sys.exit(0)
signal.signal(signal.SIGUSR1, on_usr1)
(tmp / "ready").write_text("")
time.sleep(600)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def start_then_kill_the_launcher(tmp_path: Path) -> int:
    """The child's pid, once its launcher (which started it with parent_death_signal=SIGUSR1) was SIGKILLed."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path), CHILD],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout is not None
        child = int(launcher.stdout.readline())
        wait_for(lambda: (tmp_path / "ready").exists(), "the child to install its SIGUSR1 handler", 60.0)
    finally:
        launcher.kill()
        launcher.wait(30)
    return child


def test_the_child_gets_the_signal_when_its_launcher_is_killed(tmp_path: Path) -> None:
    child = start_then_kill_the_launcher(tmp_path)
    try:
        wait_for(lambda: (tmp_path / "got").exists(), "SIGUSR1 in the child after its launcher's SIGKILL", 60.0)
    finally:
        signal_pid(child, signal.SIGKILL)


# The hook run in a child of the process that made it returns; run one level further down (its maker is no
# longer the parent: as when the launcher dies between fork and prctl) it ends the process with exit 1.
RACE = """\
import os, signal
from pdlaunch.launcher.process import parent_death_hook
hook = parent_death_hook(signal.SIGUSR1)
def run_hook():
    hook()
    os._exit(0)
child = os.fork()
if child == 0:
    run_hook()
_, status = os.waitpid(child, 0)
print(os.waitstatus_to_exitcode(status))
child = os.fork()
if child == 0:
    grandchild = os.fork()
    if grandchild == 0:
        run_hook()
    os._exit(os.waitstatus_to_exitcode(os.waitpid(grandchild, 0)[1]))
_, status = os.waitpid(child, 0)
print(os.waitstatus_to_exitcode(status))
"""


def test_a_child_whose_launcher_died_before_prctl_does_not_start() -> None:
    done = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["0", "1"], done.stdout + done.stderr


def test_off_linux_there_is_no_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert parent_death_hook(signal.SIGUSR1) is None
