"""The arrival window of async scheduling (engine/arrival_window.py): how long the engine loop may wait for a new
request before it schedules the next step, its margin learned from late launches, and the loop's use of it (a
command ends the wait at once)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pdlaunch.engine import arrival_window
from pdlaunch.engine.arrival_window import EARLY_STEP_S, LATE_STEP_S, MIN_MARGIN_S, START_MARGIN_S, ArrivalWindow
from pdlaunch.engine.stats import EngineStats
from pdlaunch.engine.step_clock import SlowDecodeSteps, StepClock
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.test_engine_loop_idle import CountingEngine


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _window(clock: Clock, late: list[int] | None = None) -> ArrivalWindow:
    counted = late if late is not None else []
    return ArrivalWindow(clock, lambda: counted.append(1))


def _launch(window: ArrivalWindow, clock: Clock, prep: float, late: bool | None) -> None:
    started = window.stepping()
    clock.t += prep
    window.launched(started, late)


def test_no_window_until_a_step_was_launched_read_and_timed() -> None:
    clock = Clock()
    window = _window(clock)
    assert window.seconds(0.007) == 0.0  # nothing launched or read yet
    _launch(window, clock, 0.001, None)
    assert window.seconds(0.007) == 0.0  # no step read yet
    window.read()
    assert window.seconds(None) == 0.0  # no decode step timed yet


def test_the_window_ends_the_launch_time_and_the_margin_before_the_device_runs_dry() -> None:
    clock = Clock()
    window = _window(clock)
    _launch(window, clock, 0.001, None)  # 1 ms to schedule and launch
    window.read()  # the device starts the launched step now; it takes 7 ms
    assert window.seconds(0.007) == pytest.approx(0.007 - 0.001 - START_MARGIN_S)
    clock.t += 0.003
    assert window.seconds(0.007) == pytest.approx(0.007 - 0.001 - START_MARGIN_S - 0.003)
    clock.t += 0.003
    assert window.seconds(0.007) == 0.0  # past its end: never negative
    assert window.seconds(0.0015) == 0.0  # a step shorter than the launch's time and margin: no window


def test_the_launch_time_is_a_recent_mean() -> None:
    clock = Clock()
    window = _window(clock)
    _launch(window, clock, 0.001, None)
    _launch(window, clock, 0.011, None)
    assert window.prep_s == pytest.approx(0.9 * 0.001 + 0.1 * 0.011)


def test_the_margin_narrows_while_windowed_launches_are_in_time_and_widens_when_one_is_late() -> None:
    clock = Clock()
    late: list[int] = []
    window = _window(clock, late)
    _launch(window, clock, 0.001, None)
    margins = [window.margin_s]
    for _ in range(100):  # each step: read, a window given, the next launch in time
        window.read()
        assert window.seconds(0.007) > 0
        _launch(window, clock, 0.001, False)
        margins.append(window.margin_s)
    assert margins[1] == pytest.approx(START_MARGIN_S - EARLY_STEP_S)
    assert margins[-1] == MIN_MARGIN_S  # never below the floor
    window.read()
    wide = window.seconds(0.007)
    assert wide == pytest.approx(0.007 - 0.001 - MIN_MARGIN_S)
    _launch(window, clock, 0.001, True)  # the device had run dry: the margin widens, the launch is counted
    assert window.margin_s == pytest.approx(MIN_MARGIN_S + LATE_STEP_S)
    assert late == [1]
    window.read()
    assert window.seconds(0.007) == pytest.approx(wide - LATE_STEP_S)


def test_only_a_launch_after_a_window_moves_the_margin_but_every_late_launch_counts() -> None:
    clock = Clock()
    late: list[int] = []
    window = _window(clock, late)
    _launch(window, clock, 0.001, None)
    window.read()
    assert window.seconds(0.0015) == 0.0  # no window given (the step is too short for one)
    _launch(window, clock, 0.001, True)
    assert window.margin_s == START_MARGIN_S and late == [1]
    window.read()
    assert window.seconds(0.007) > 0
    _launch(window, clock, 0.001, None)  # nothing in flight to ask (a step that could not be deferred)
    assert window.margin_s == START_MARGIN_S


def test_a_host_too_slow_for_the_device_closes_the_window() -> None:
    clock = Clock()
    window = _window(clock)
    _launch(window, clock, 0.001, None)
    for _ in range(40):  # every windowed launch late
        window.read()
        if window.seconds(0.007) == 0.0:
            break
        _launch(window, clock, 0.001, True)
    else:
        raise AssertionError("late launches never closed the window")
    assert window.margin_s >= 0.007 - 0.001
    for _ in range(40):  # the host keeps up again (the late launches were a burst, a GC pause): launches in time
        window.read()
        if window.seconds(0.007) > 0.0:
            break
        _launch(window, clock, 0.001, False)
    else:
        raise AssertionError("launches in time never opened the window again: closed for good, for nothing")


def test_a_launch_in_time_without_a_window_narrows_the_margin_but_a_late_one_does_not_widen_it() -> None:
    clock = Clock()
    window = _window(clock)
    _launch(window, clock, 0.001, None)
    window.read()
    assert window.seconds(0.0015) == 0.0  # no window (the step is too short for one)
    _launch(window, clock, 0.001, False)
    assert window.margin_s == pytest.approx(START_MARGIN_S - EARLY_STEP_S)
    window.read()
    assert window.seconds(0.0015) == 0.0
    _launch(window, clock, 0.001, True)  # late without a window: no window to blame
    assert window.margin_s == pytest.approx(START_MARGIN_S - EARLY_STEP_S)


def test_the_switch_turns_the_window_off(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    window = _window(clock)
    _launch(window, clock, 0.0, None)
    window.read()
    assert window.seconds(0.007) > 0
    monkeypatch.setattr(arrival_window, "WINDOW_ON", False)
    assert window.seconds(0.007) == 0.0


def _decode_clock(steps_ms: list[float]) -> StepClock:
    """The engine's clock (its SlowDecodeSteps keeps the decode steps' times) after decode steps of these times."""
    slow = SlowDecodeSteps(count=lambda: None)
    for ms in steps_ms:
        slow.observe(8, 8, ms / 1000)
    return StepClock(None, lambda r, t, s: None, slow)


@pytest.mark.parametrize("steps_ms", [[5.0] * 100 + [2000.0], [15.0] * 100 + [5.0]],
                         ids=["after-one-stalled-step", "after-the-batch-shrank"])
def test_the_window_never_outlasts_the_decode_steps_the_device_now_runs(steps_ms: list[float]) -> None:
    """One 2 s step (a kernel compiled on first use) took the recent mean from 5 to 105 ms, and a batch that shrank
    left it at 15 ms while steps took 5: the loop waited for arrivals that long while the device, done after 5 ms,
    sat idle, every stream's next token late, for dozens of steps."""
    clock = Clock()
    window = _window(clock)
    _launch(window, clock, 0.001, None)
    window.read()  # the step in flight takes 5 ms, as the device's decode steps now do
    assert 0.0 < window.seconds(_decode_clock(steps_ms).decode_step_s) <= 0.005 - 0.001


def test_a_first_decode_step_alone_opens_no_window() -> None:
    """The first decode step has no recent mean to be judged slow against: a first-use stall there (a kernel compiled
    on its first launch, 2 s) read as the steps' time, and the loop waited for arrivals that long after the next
    step, 5 ms on the device, had finished: the stall twice over for every stream."""
    clock = Clock()
    window = _window(clock)
    _launch(window, clock, 0.001, None)
    window.read()  # the second decode step runs; the first one (2 s) is all the clock has seen
    assert _decode_clock([2000.0]).decode_step_s is None
    assert window.seconds(_decode_clock([2000.0]).decode_step_s) == 0.0
    assert 0.0 < window.seconds(_decode_clock([2000.0, 5.0]).decode_step_s) <= 0.005 - 0.001  # judged from the 2nd
    assert window.seconds(_decode_clock([5.0, 5.0]).decode_step_s) == pytest.approx(0.005 - 0.001 - START_MARGIN_S)


class BusyEngine(CountingEngine):
    """A busy engine whose arrival window is far longer than any test timeout: only a command can end the wait."""

    def __init__(self) -> None:
        super().__init__()
        self.quiescent = False
        self.windows = 0

    def has_unfinished_requests(self) -> bool:
        return True

    def arrival_window_s(self) -> float:
        self.windows += 1
        return 600.0

    def stats(self) -> EngineStats:
        return {**super().stats(), "num_running": 1, "num_blocks_used": 1}


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
