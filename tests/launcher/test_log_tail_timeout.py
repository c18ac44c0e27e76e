"""A dead child's log is read on the launcher's main thread, to say why it died. On a hung file system (an NFS server
that stopped answering) that read blocked for good: the launcher could neither restart the others nor stop. It is read
within TAIL_TIMEOUT_S now (log_tail.py); past that the launcher says the log could not be read, naming it, and goes
on. A FIFO no one writes blocks its reader in open(), as a hung mount does."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pdlaunch.config.rules.host import LOCK_NAME
from pdlaunch.launcher import log_tail
from pdlaunch.launcher.backends.slurm_lines import NodeDevices
from pdlaunch.launcher.log_dir_lock import LogDirInUse, LogDirLock
from pdlaunch.launcher.log_tail import LogUnreadable
from pdlaunch.launcher.process import ChildProcess
from pdlaunch.launcher.serve import report_failure
from tests.serving.helpers import wait_for
from tests.serving.test_fault_tolerance_supervisor import supervised_pd

TIMEOUT_S = 0.5
BOUND_S = 30.0  # generous: the read must end long before a hung mount would let it


@pytest.fixture()
def hung_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A log whose open() blocks (a FIFO with no writer); the blocked readers are let go at the end."""
    monkeypatch.setattr(log_tail, "TAIL_TIMEOUT_S", TIMEOUT_S)
    fifo = tmp_path / "hung.log"
    os.mkfifo(fifo)
    yield fifo
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a reader blocked in open() counts: this one opens
    os.close(writer)  # EOF: the stuck threads end


def _ended_child(tmp_path: Path, name: str, log: Path) -> ChildProcess:
    """A child that exited with code 1, whose log is then `log`."""
    child = ChildProcess(name, [sys.executable, "-c", "raise SystemExit(1)"], tmp_path / f"{name}.log")
    child.start()
    wait_for(lambda: child.poll() is not None, f"{name} to exit", 30)
    child.close_log()
    child.log_path = log
    return child


def _within(bound: float, call: Callable[[], object]) -> None:
    start = time.monotonic()
    call()
    took = time.monotonic() - start
    assert took < bound, f"took {took:.1f}s"


def test_a_read_that_blocks_ends_at_its_timeout_naming_the_file(tmp_path: Path) -> None:
    release = threading.Event()

    def blocking(path: Path, lines: int, since: int) -> list[str]:
        release.wait(120)
        return ["read at last"]

    log = tmp_path / "decode-0.log"
    try:
        with pytest.raises(LogUnreadable) as raised:
            _within(BOUND_S, lambda: log_tail.log_tail(log, 20, timeout=TIMEOUT_S, read=blocking))
        assert str(raised.value) == (f"its log {log} could not be read within 0.5s (a hung file system? an NFS "
                                     "server that does not answer)")
        # while that read is stuck, no second one starts: said at once, not after another timeout
        start = time.monotonic()
        with pytest.raises(LogUnreadable):
            log_tail.log_tail(log, 20, timeout=10 * TIMEOUT_S, read=blocking)
        assert time.monotonic() - start < 10 * TIMEOUT_S
    finally:
        release.set()

    def read_again() -> bool:
        try:
            return log_tail.log_tail(log, 20, timeout=TIMEOUT_S, read=blocking) == ["read at last"]
        except LogUnreadable:  # the stuck read has not returned yet
            return False

    wait_for(read_again, "the log to be read again once the stuck read returned", 30)


def test_a_log_that_cannot_be_opened_is_no_lines(tmp_path: Path) -> None:
    assert log_tail.log_tail(tmp_path / "gone.log", 20) == []


def test_the_supervisor_says_the_log_could_not_be_read_and_restarts(tmp_path: Path, hung_log: Path) -> None:
    with supervised_pd(tmp_path, restart=True) as (deployment, supervisor, console):
        child = _ended_child(tmp_path, deployment.instances[1].name, hung_log)
        deployment.instances[1] = child
        supervisor.records[1] = (child, supervisor.records[1][1])
        _within(BOUND_S, supervisor.tick)  # reaps it, reads why it died: bounded
        said = console.export_text()
        assert (f"exited with code 1: its log {hung_log} could not be read within 0.5s" in said
                and "restart 1 in" in said), said


def test_a_failure_report_says_the_log_could_not_be_read(tmp_path: Path, hung_log: Path) -> None:
    child = _ended_child(tmp_path, "decode-0", hung_log)
    written = io.StringIO()
    _within(BOUND_S, lambda: report_failure(Console(file=written, width=1000), "decode-0 exited with code 1", child))
    assert f"decode-0: its log {hung_log} could not be read within 0.5s" in written.getvalue(), written.getvalue()


def test_the_ray_backends_failure_report_says_the_log_could_not_be_read(hung_log: Path) -> None:
    pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")
    from pdlaunch.launcher.backends.ray import show_log_tail

    written = io.StringIO()
    _within(BOUND_S, lambda: show_log_tail(Console(file=written, width=1000), hung_log))
    assert f"its log {hung_log} could not be read within 0.5s" in written.getvalue(), written.getvalue()


def test_a_slurm_node_log_that_blocks_is_not_reported_yet(tmp_path: Path, hung_log: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The batch launcher polls the nodes' logs for their device lines on its main thread (slurm.py NodeDevices): a
    log on a hung file system counts as not said yet, logged naming it, within the timeout; later polls while that
    read is stuck are said at once, and the other node's log is still read."""
    from tests.cluster.test_slurm_node_lines import cfg

    other = tmp_path / "slurm-node1.log"
    other.write_text("node 1: device cpu\n")
    devices = NodeDevices(cfg(tmp_path), [hung_log, other])
    with caplog.at_level(logging.WARNING, logger="pdlaunch.launcher.backends.slurm_lines"):
        _within(BOUND_S, devices.disagreement)
        _within(BOUND_S, devices.disagreement)
    assert devices.devices == {1: "cpu"}, devices.devices
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"node 0's device line not read yet: its log {hung_log} could not be read within 0.5s (a hung "
                    "file system? an NFS server that does not answer)"], said


def test_a_log_dir_lock_whose_note_blocks_still_refuses_within_the_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live holder's note on a hung file system: the second run is refused within the timeout, the note named."""
    monkeypatch.setattr(log_tail, "TAIL_TIMEOUT_S", TIMEOUT_S)
    release = threading.Event()
    reads = Path.read_text

    def blocking(path: Path, *args: Any, **kwargs: Any) -> str:
        if path.name == LOCK_NAME:
            release.wait(120)
        return reads(path, *args, **kwargs)

    lock_file = tmp_path / LOCK_NAME
    lock_file.write_text('{"pid": 1, "command": "pdlaunch serve"}')
    holder = os.open(lock_file, os.O_RDWR)
    monkeypatch.setattr(Path, "read_text", blocking)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: flock refuses this process too
        with pytest.raises(LogDirInUse) as refused:
            _within(BOUND_S, lambda: LogDirLock(tmp_path).acquire(None))
        assert (f"(its owner is unknown: {lock_file} could not be read within 0.5s (a hung file system?))"
                in refused.value.message), refused.value.message
    finally:
        release.set()
        os.close(holder)
