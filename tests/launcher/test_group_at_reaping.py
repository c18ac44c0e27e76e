"""What a child leaves when it ends: the rest of its process group is SIGKILLed as soon as its leader is reaped
(Supervisor._ended), and never again after that (its id may be another process's by then: the restart came 1-30 s
later and signalled it once more); and the directory a start was given (tmp_dir_flag: the proxy's metrics files and
load board) is removed then, however the process ended, and a new start gets a new, empty one."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.process import ChildProcess
from tests.serving.helpers import wait_for
from tests.serving.test_fault_tolerance_supervisor import supervised_pd

# Writes a file into the directory its last flag names, starts a grandchild in its own process group (a TP worker, a
# proxy worker), prints that one's pid, and either exits 1 (a leader that died) or sleeps (one the launcher stops).
LEADER = """
import pathlib, subprocess, sys, time
(pathlib.Path(sys.argv[-1]) / "board").write_text("rows")
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(worker.pid, flush=True)
if sys.argv[1] == "exit":
    sys.exit(1)
time.sleep(120)
"""


def _leader(tmp_path: Path, name: str, then: str) -> ChildProcess:
    return ChildProcess(name, [sys.executable, "-c", LEADER, then], tmp_path / f"{name}.log", tmp_dir_flag="--tmp-dir")


def _worker_pid(child: ChildProcess) -> int:
    wait_for(lambda: child.log_path.read_text().strip().isdigit(), f"{child.name}'s worker to start", 60)
    return int(child.log_path.read_text().strip())


def _gone(pid: int) -> bool:
    """Not running (a zombie, its parent gone, waits only for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_gone(pid: int) -> None:
    wait_for(lambda: _gone(pid), f"pid {pid} to be killed", 30)


def test_a_dead_leaders_group_is_killed_when_it_is_reaped_and_its_directory_removed(tmp_path: Path) -> None:
    with supervised_pd(tmp_path, restart=True) as (deployment, supervisor, _):
        child = _leader(tmp_path, deployment.instances[1].name, "exit")
        deployment.instances[1] = child
        supervisor.records[1] = (child, supervisor.records[1][1])
        child.start()
        try:
            worker = _worker_pid(child)
            assert child.tmp_dir is not None and (child.tmp_dir / "board").is_file()
            made = child.tmp_dir
            wait_for(lambda: child.poll() is not None, "the leader to exit", 30)
            assert not _gone(worker) and made.is_dir()  # the leader's exit alone leaves both
            supervisor.tick()  # sees the exit: the restart is due after the backoff
            _wait_gone(worker)
            assert not made.exists(), f"left behind: {sorted(p.name for p in made.iterdir())}"
            assert "restart 1 in" in supervisor.console.export_text()
        finally:
            child.stop(0.0)


def test_the_group_is_not_signalled_after_it_ended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the group was killed at reaping, a stop or the restart sends nothing to that group id: the kernel may have
    given it to another process (the restart comes after a backoff of up to 30 s). A restart that could not start
    the process leaves it so too."""
    child = _leader(tmp_path, "decode-0", "exit")
    child.start()
    first_pid = child.pid
    wait_for(lambda: child.poll() is not None, "the leader to exit", 30)
    child.signal_group(signal.SIGKILL)  # Supervisor._ended
    sent: list[tuple[int, int]] = []
    real_killpg = os.killpg
    monkeypatch.setattr(os, "killpg", lambda pgid, sig: sent.append((pgid, sig)) or real_killpg(pgid, sig))
    child.signal_group(signal.SIGKILL)
    child.stop(0.0)
    argv, child.argv = child.argv, [str(tmp_path / "no-such-program")]
    with pytest.raises(PdlaunchError, match="cannot start decode-0"):  # a restart that could not start
        child.start(note="restart 1 of decode-0 (exited with code 1)")
    assert child.pid == first_pid and child.tmp_dir is None
    child.stop(0.0)
    child.argv = argv
    child.start(note="restart 2 of decode-0 (could not be restarted)")
    try:
        assert child.pid != first_pid
        assert all(pgid != first_pid for pgid, _ in sent), sent
    finally:
        child.stop(0.0)


def test_a_sigkilled_process_leaves_no_directory_and_a_restart_gets_a_new_empty_one(tmp_path: Path) -> None:
    child = _leader(tmp_path, "proxy", "sleep")
    child.start()
    try:
        worker = _worker_pid(child)
        first = child.tmp_dir
        assert first is not None and (first / "board").is_file()
        child.stop(0.0)  # a hurried stop: SIGKILL at once, no exit of its own that removes anything
        _wait_gone(worker)
        assert not first.exists(), f"left behind: {sorted(p.name for p in first.iterdir())}"
        child.start(note="restart 1 of the proxy")
        second = child.tmp_dir
        assert second is not None and second != first
        wait_for(lambda: (second / "board").is_file(), "the restarted process to write its file", 30)
        assert [p.name for p in second.iterdir()] == ["board"]  # its own file only: nothing of the dead run's
    finally:
        child.stop(0.0)
    assert child.tmp_dir is None and not second.exists()


def test_a_start_whose_directory_cannot_be_made_is_our_error_and_closes_its_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TMPDIR full (space or inodes) or read-only at a proxy's start or restart: a PdlaunchError naming TMPDIR, which
    the supervisor reports as a failed restart, not an OSError that ends serve with a traceback; no log left open."""
    import errno
    import tempfile

    def full(*args: object, **kwargs: object) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkdtemp", full)
    child = _leader(tmp_path, "proxy", "exit")
    with pytest.raises(PdlaunchError) as raised:
        child.start()
    assert raised.value.field == "TMPDIR"
    assert "cannot make its temporary directory" in str(raised.value) and "No space left on device" in str(raised.value)
    assert child.popen is None and child._log is None
