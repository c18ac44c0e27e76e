"""Rank 0 stopping its workers: one that has not exited within JOIN_TIMEOUT_S after "shutdown" (hung) is killed at
once. Workers ignore SIGTERM (so the launcher's Ctrl-C to the group does not kill them before rank 0 stops them), so
terminating it first only waited another JOIN_TIMEOUT_S. One that is stopped (SIGSTOP, a debugger) cannot act on
"shutdown" before it is continued: it is killed without that wait (before, every stop with a stopped rank took
JOIN_TIMEOUT_S, 10 s). The workers share one JOIN_TIMEOUT_S and are killed together: each in turn made a TP 8
instance whose workers could not read "shutdown" (still loading) take 70 s to stop."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pdlaunch.distributed import tp_ranks
from pdlaunch.distributed.tp_ranks import TPRanks

GUARD_S = 20.0  # only bounds a broken test: without a bound the second join never returns


class _HungWorker:
    pid = 4242

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.alive = True

    def join(self, timeout: float | None = None) -> None:
        self.calls.append("join")

    def is_alive(self) -> bool:
        return self.alive

    def terminate(self) -> None:
        self.calls.append("terminate")  # ignored, as the worker ignores SIGTERM

    def kill(self) -> None:
        self.calls.append("kill")
        self.alive = False


def test_a_worker_that_does_not_exit_is_killed_after_one_wait() -> None:
    ranks = TPRanks("engine", 2)
    worker = _HungWorker()
    ranks.procs = {1: worker}  # type: ignore[dict-item]
    ranks.stop()
    assert worker.calls == ["join", "kill", "join"]


class _UnkillableWorker(_HungWorker):
    """A worker stuck in the kernel (uninterruptible: a hung device driver): SIGKILL takes effect only once it
    leaves, so a join without a timeout never returns."""

    def __init__(self) -> None:
        super().__init__()
        self.waited: list[float | None] = []

    def join(self, timeout: float | None = None) -> None:
        self.waited.append(timeout)
        threading.Event().wait(timeout)

    def kill(self) -> None:
        self.calls.append("kill")


def test_a_worker_that_survives_sigkill_is_named_and_left_within_a_bound(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(tp_ranks, "JOIN_TIMEOUT_S", 0.1)
    ranks = TPRanks("engine", 2)
    worker = _UnkillableWorker()
    ranks.procs = {1: worker}  # type: ignore[dict-item]
    stopper = threading.Thread(target=ranks.stop, daemon=True)
    with caplog.at_level(logging.ERROR, logger=tp_ranks.__name__):
        stopper.start()
        stopper.join(GUARD_S)
    assert not stopper.is_alive(), f"stopping the workers waited over {GUARD_S:.0f}s on a worker SIGKILL cannot end"
    assert len(worker.waited) == 2 and all(0.05 < w <= 0.1 for w in worker.waited if w is not None), worker.waited
    assert "TP rank 1 (pid 4242) did not exit within 0.1s of SIGKILL: it is stuck in an uninterruptible call" in \
        caplog.text, caplog.text


class _StoppedWorker(_HungWorker):
    """A real process stopped by SIGSTOP (its /proc state T), joined and killed through the calls TPRanks makes."""

    def __init__(self) -> None:
        super().__init__()
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.pid = self.proc.pid  # type: ignore[misc]
        os.kill(self.pid, signal.SIGSTOP)

    def join(self, timeout: float | None = None) -> None:
        self.calls.append("join")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.calls.append("kill")
        self.proc.kill()


def test_a_stopped_worker_is_killed_without_waiting_for_an_exit_it_cannot_make(
        caplog: pytest.LogCaptureFixture) -> None:
    ranks = TPRanks("engine", 2)
    worker = _StoppedWorker()
    try:
        deadline = time.monotonic() + GUARD_S
        while open(f"/proc/{worker.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
            assert time.monotonic() < deadline, "the worker did not stop"
            time.sleep(0.01)
        ranks.procs = {1: worker}  # type: ignore[dict-item]
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=tp_ranks.__name__):
            ranks.stop()
        assert worker.calls == ["kill", "join"] and not worker.is_alive()
        assert time.monotonic() - began < tp_ranks.JOIN_TIMEOUT_S / 2
        assert f"TP rank 1 (pid {worker.pid}) is stopped (SIGSTOP or a debugger)" in caplog.text, caplog.text
    finally:
        worker.proc.kill()
        worker.proc.wait(GUARD_S)


def _still_building() -> None:
    """A worker that reads no "shutdown" yet: it is still loading its shard or waiting in the store's join."""
    time.sleep(120)


def test_stopping_busy_workers_waits_one_join_timeout_not_one_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tp_ranks, "JOIN_TIMEOUT_S", 1.0)
    ranks = TPRanks("decode-0", 5)
    ctx = mp.get_context("spawn")
    try:
        for rank in range(1, 5):
            proc = ctx.Process(target=_still_building, daemon=True)
            proc.start()
            ranks.procs[rank] = proc
        began = time.monotonic()
        ranks.stop()
        took = time.monotonic() - began
        assert not any(p.is_alive() for p in ranks.procs.values())
        assert took < 2.5, f"stopping 4 busy workers took {took:.1f}s: JOIN_TIMEOUT_S (1 s here, 10 s really) each"
    finally:
        for proc in ranks.procs.values():
            proc.kill()
