"""The arrival window of async scheduling (async_step.py): how long the engine loop may wait for a new request
before it schedules the next step, and the loop's use of it (a command ends the wait at once)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pdlaunch.engine import async_step
from pdlaunch.engine.async_step import WINDOW_SAFETY_S, ArrivalWindow
from pdlaunch.engine.stats import EngineStats
from pdlaunch.server.engine_loop import EngineLoop


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_no_window_until_a_step_was_launched_read_and_timed() -> None:
    clock = Clock()
    window = ArrivalWindow(clock)
    assert window.seconds(0.007) == 0.0  # nothing launched or read yet
    started = window.stepping()
    clock.t += 0.001
    window.launched(started)
    assert window.seconds(0.007) == 0.0  # no step read yet
    window.read()
    assert window.seconds(None) == 0.0  # no decode step timed yet


def test_the_window_ends_twice_the_launch_time_and_a_margin_before_the_device_runs_dry() -> None:
    clock = Clock()
    window = ArrivalWindow(clock)
    started = window.stepping()
    clock.t += 0.001  # 1 ms to schedule and launch
    window.launched(started)
    window.read()  # the device starts the launched step now; it takes 7 ms
    assert window.seconds(0.007) == pytest.approx(0.007 - 0.002 - WINDOW_SAFETY_S)
    clock.t += 0.003
    assert window.seconds(0.007) == pytest.approx(0.007 - 0.002 - WINDOW_SAFETY_S - 0.003)
    clock.t += 0.003
    assert window.seconds(0.007) == 0.0  # past its end: never negative
    assert window.seconds(0.002) == 0.0  # a step shorter than the launch's time: no window


def test_the_launch_time_is_a_recent_mean() -> None:
    clock = Clock()
    window = ArrivalWindow(clock)
    for prep in (0.001, 0.011):
        started = window.stepping()
        clock.t += prep
        window.launched(started)
    assert window.prep_s == pytest.approx(0.9 * 0.001 + 0.1 * 0.011)


def test_the_switch_turns_the_window_off(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    window = ArrivalWindow(clock)
    started = window.stepping()
    window.launched(started)
    window.read()
    assert window.seconds(0.007) > 0
    monkeypatch.setattr(async_step, "WINDOW_ON", False)
    assert window.seconds(0.007) == 0.0


class BusyEngine:
    """A busy engine whose arrival window is far longer than any test timeout: only a command can end the wait."""

    rank_engine_ids: list[str] = []  # what /info shows: the executor knows no ranks, no connector
    rank_nodes: list[str] = []
    connector = None

    def __init__(self) -> None:
        self.steps = 0
        self.windows = 0
        self.lock = threading.Lock()

    def is_quiescent(self) -> bool:
        return False

    def has_unfinished_requests(self) -> bool:
        return True

    def arrival_window_s(self) -> float:
        self.windows += 1
        return 600.0

    def step(self) -> list[object]:
        with self.lock:
            self.steps += 1
        return []

    def take_admitted(self) -> list[object]:  # no PD decode admitted with its first token
        return []

    def stats(self) -> EngineStats:
        return {"num_running": 1, "num_waiting": 0, "num_waiting_for_kv": 0, "num_blocks_total": 8,
                "num_blocks_used": 1}  # type: ignore[typeddict-item]

    def check_integrity(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def test_a_busy_loop_waits_out_the_window_unless_a_command_comes() -> None:
    engine = BusyEngine()
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001, quiescent_wait_s=600.0)  # type: ignore[arg-type,return-value]
    loop.start()
    try:
        assert loop.wait_ready(30), "the engine loop to start"

        async def calls() -> list[int]:
            return [await loop.call(lambda e: e.steps, timeout=30) for _ in range(10)]  # type: ignore[attr-defined]

        seen = asyncio.run(calls())  # each answered within the timeout: a command ends the window's wait
        assert all(0 <= b - a <= 1 for a, b in zip(seen, seen[1:])), seen
        assert engine.windows >= 1
        # A window with no command (what is measured is that nothing happens): a loop that ignored the window
        # would step thousands of times in it.
        before = engine.steps
        threading.Event().wait(1.0)
        assert engine.steps - before <= 1, f"{engine.steps - before} steps in 1 s inside a 600 s window"
    finally:
        loop.stop()
