"""The KV block integrity check's schedule on the engine thread (server/idle_check.py): after the engine has been
idle IDLE_S, at most once per EVERY_S, and only when requests ran since the last check."""

from __future__ import annotations

import math
import threading

from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.idle_check import IdleCheck
from tests.serving.helpers import wait_for
from tests.serving.test_engine_loop_idle import CountingEngine


def test_not_due_before_any_request_ran() -> None:
    check = IdleCheck(idle_s=0.2, every_s=5.0)
    assert not check.after_step(False, 100.0) and math.isinf(check.due_in(100.0))
    assert not check.after_step(False, 200.0)


def test_due_once_the_engine_was_idle_a_while_not_the_moment_it_went_idle() -> None:
    check = IdleCheck(idle_s=0.2, every_s=5.0)
    assert not check.after_step(True, 10.0)  # serving
    assert not check.after_step(False, 10.05)  # went idle: a request arriving now must not wait for a check
    assert abs(check.due_in(10.1) - 0.15) < 1e-9
    assert not check.after_step(True, 10.1)  # a request came: the idle time starts again
    assert not check.after_step(False, 10.2)
    assert not check.after_step(False, 10.35)
    assert check.after_step(False, 10.4)
    check.ran(10.4)
    assert not check.after_step(False, 11.0) and math.isinf(check.due_in(11.0))  # nothing ran since


def test_a_request_that_ends_within_its_first_step_is_checked_after_too() -> None:
    check = IdleCheck(idle_s=0.2, every_s=5.0)
    check.after_step(False, 1.0)  # idle since 1.0
    check.added()  # a prefill's request: added, computed and finished in the next step
    assert not check.after_step(False, 5.0)  # idle again from 5.0, not since 1.0: no check at once
    assert check.after_step(False, 5.25)


def test_at_most_once_per_interval_under_steady_traffic() -> None:
    check = IdleCheck(idle_s=0.2, every_s=5.0)
    checks, now = 0, 0.0
    for _ in range(100):  # a request every 0.5 s for 50 s, each served in 0.1 s, idle 0.4 s between
        check.after_step(True, now)
        for t in (0.1, 0.35, 0.45):
            if check.after_step(False, now + t):
                check.ran(now + t)
                checks += 1
        now += 0.5
    assert checks == 10  # 50 s / EVERY_S, not one per request


class ServingEngine(CountingEngine):
    """Busy for its first `busy_steps` steps, then idle; counts its integrity checks."""

    def __init__(self, busy_steps: int) -> None:
        super().__init__()
        self.quiescent = False
        self.busy_steps = busy_steps
        self.checks: list[int] = []  # the step count at each check

    def has_unfinished_requests(self) -> bool:
        return self.steps < self.busy_steps

    def check_integrity(self) -> None:
        self.checks.append(self.steps)


def test_the_engine_thread_checks_once_after_its_requests_end() -> None:
    engine = ServingEngine(busy_steps=20)
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001, quiescent_wait_s=600.0)  # type: ignore[arg-type,return-value]
    loop.start()
    try:
        assert loop.wait_ready(30), "the engine loop to start"
        wait_for(lambda: len(engine.checks) == 1, "the integrity check after the engine went idle", 60)
        assert engine.checks[0] > 20  # not at the step it went idle: it stepped idle for IDLE_S first
        threading.Event().wait(0.5)  # a window (nothing ran since): no second check
        assert len(engine.checks) == 1
    finally:
        loop.stop()


class BrokenEngine(ServingEngine):
    def check_integrity(self) -> None:
        super().check_integrity()
        raise RuntimeError("group 0: block 3 has ref count 1 and free=True")


def test_a_failed_check_is_counted_and_serving_goes_on() -> None:
    from pdlaunch.metrics.instance import KV_INTEGRITY_CHECKS, KV_INTEGRITY_FAILURES

    checks0, failures0 = KV_INTEGRITY_CHECKS._value.get(), KV_INTEGRITY_FAILURES._value.get()
    engine = BrokenEngine(busy_steps=5)
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001, quiescent_wait_s=600.0)  # type: ignore[arg-type,return-value]
    loop.start()
    try:
        assert loop.wait_ready(30), "the engine loop to start"
        wait_for(lambda: KV_INTEGRITY_FAILURES._value.get() == failures0 + 1, "the failed check counted", 60)
        assert KV_INTEGRITY_CHECKS._value.get() == checks0 + 1
        steps = engine.steps
        wait_for(lambda: engine.steps > steps, "the engine stepping on after a failed check", 60)
    finally:
        loop.stop()
