"""How long the engine loop may wait for new requests before it schedules the next step (async scheduling).

With async scheduling (async_step.py) the host schedules and launches step N+2 as soon as it has read step N's
tokens, i.e. as the device starts N+1. A request that arrives a moment later joins N+3: it waits for N+1 and N+2
before its own step, a whole step more than if it had come just before. On a decode that runs the new turns of
conversations beside its streams (issue 31's decode-only turns) that step is ~5 ms of a ~25 ms time to first token.

`ArrivalWindow` lets the loop wait for arrivals after reading N's tokens, until the launch of N+2 must start for
the device not to run dry: the recent decode steps' device time (the lower of their mean and the latest, so that a
stalled step or a shrunk batch does not stretch it: step_clock.py `decode_step_s`), less the host's recent time to
schedule and launch a step (`prep_s`) and a margin. A request that comes in the window joins N+2; with none, N+2 is
launched at the window's end.

The margin learns from the device. At each launch the host asks, without waiting, whether the step in flight has
already finished: if so, the device waited for this launch (a late launch). A late launch after a window widens
the margin by LATE_STEP_S; one in time, after a window or not, narrows it by EARLY_STEP_S, down to MIN_MARGIN_S. So
the window settles where about one windowed launch in LATE_STEP_S / EARLY_STEP_S is late, each by a fraction of a
millisecond, and closes by itself on a host too slow to keep up (the margin grows to the whole step); closed so,
it opens again once launches are in time again (a burst of late launches does not close it for good). Every late
launch, windowed or not, is counted (`pdlaunch_engine_late_launches_total`): the device idled waiting for the host.

PDLAUNCH_ARRIVAL_WINDOW=off schedules the next step at once (A/B measurements).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from pdlaunch.metrics.engine_steps import count_late_launch

PREP_WEIGHT = 0.1  # weight of the newest step in the recent time to schedule and launch a step
START_MARGIN_S = 0.001  # the margin before any launch was judged (on top of prep_s: the first window is short)
MIN_MARGIN_S = 0.0002
LATE_STEP_S = 0.0005  # a late launch after a window widens the margin this much ...
EARLY_STEP_S = 0.00005  # ... and one in time narrows it this much
WINDOW_ON = os.environ.get("PDLAUNCH_ARRIVAL_WINDOW", "on") != "off"


class ArrivalWindow:
    """The window of the module doc: `stepping` at a step's start, `launched(started, late)` once its forward is
    queued (late: the step in flight had already finished), `read` when a step's tokens are on the host,
    `seconds(step_s)` with the recent decode steps' device time."""

    def __init__(self, now: Callable[[], float] = time.perf_counter,
                 count_late: Callable[[], None] = count_late_launch) -> None:
        self._now = now
        self._count_late = count_late
        self.prep_s: float | None = None  # recent host time from a step's start to its forward queued
        self.margin_s = START_MARGIN_S + 0.0  # learned (module doc), on top of prep_s
        self.read_at: float | None = None  # when the host last read a step's tokens
        self._opened = False  # the loop was given a window before the step now launched

    def stepping(self) -> float:
        return self._now()

    def launched(self, started: float, late: bool | None) -> None:
        """The step begun at `started` is queued; `late`: whether the step before it had finished by then (None:
        no step in flight to ask)."""
        prep = self._now() - started
        self.prep_s = prep if self.prep_s is None else (1 - PREP_WEIGHT) * self.prep_s + PREP_WEIGHT * prep
        if late:
            self._count_late()
        if late is False or (late and self._opened):
            # A launch in time narrows the margin with or without a window: a window closed by the margin alone
            # (after a burst of late launches) opens again once the host keeps up; a late one widens it only
            # after a window (without one the loop did not wait)
            self.margin_s = min(self.margin_s + LATE_STEP_S, 1.0) if late else \
                max(MIN_MARGIN_S, self.margin_s - EARLY_STEP_S)
        self._opened = False

    def read(self) -> None:
        self.read_at = self._now()

    def seconds(self, step_s: float | None) -> float:
        """0 until a step was read, timed and launched; else what is left of the window."""
        if not WINDOW_ON or step_s is None or self.prep_s is None or self.read_at is None:
            return 0.0
        left = self.read_at + step_s - self.prep_s - self.margin_s - self._now()
        if left <= 0:
            return 0.0
        self._opened = True
        return left
