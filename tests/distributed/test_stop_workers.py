"""Rank 0 stopping its workers: one that has not exited within JOIN_TIMEOUT_S after "shutdown" (hung, stopped)
is killed at once. Workers ignore SIGTERM (so the launcher's Ctrl-C to the group does not kill them before rank 0
stops them), so terminating it first only waited another JOIN_TIMEOUT_S."""

from __future__ import annotations

import threading

from pdlaunch.distributed.executor import TPExecutor


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
    executor = TPExecutor.__new__(TPExecutor)  # only what _stop_workers reads
    worker = _HungWorker()
    executor._closing, executor._conns, executor._procs = threading.Event(), [], {1: worker}  # type: ignore[dict-item]
    executor._stop_workers()  # noqa: SLF001
    assert worker.calls == ["join", "kill", "join"]
