"""The proxy's worker supervisor stops whatever its workers do: a worker still there after SIGKILL (stuck in the
kernel, where no signal reaches it) is named in the log and left, not a TimeoutExpired traceback out of the stop."""

from __future__ import annotations

import logging
import signal
import subprocess
from typing import cast

import pytest

from pdlaunch.proxy import workers
from pdlaunch.proxy.workers import Supervisor


class Unkillable:
    """What subprocess.Popen shows of a process in uninterruptible sleep: signals are sent, no wait ever ends."""

    pid = 4242

    def __init__(self) -> None:
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return None

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def kill(self) -> None:
        self.signals.append(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        raise subprocess.TimeoutExpired("pdlaunch.proxy", timeout or 0.0)


def test_a_worker_that_survives_sigkill_is_named_and_left(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(workers, "KILL_GRACE_S", 0.0)
    supervisor = Supervisor([], "127.0.0.1", 0, 1, drain_s=1.0, parent_pid=None, instances=["colocated-0"])
    stuck = Unkillable()
    supervisor.procs = [cast(subprocess.Popen[bytes], stuck)]
    with caplog.at_level(logging.ERROR, logger=workers.log.name):
        supervisor._reap()
    assert stuck.signals == [signal.SIGTERM, signal.SIGKILL]
    assert "proxy worker 0 (pid 4242) still runs 10 s after SIGKILL (stuck in the kernel" in caplog.text
