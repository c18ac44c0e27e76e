"""Engine step times for `pdlaunch_engine_step_seconds`, as the device ran them.

The host's clock cannot time a step on a GPU. A launch returns before its work is done, and a launch that
blocks (a full launch queue, a wait for a staging buffer) can move the moment the host reads one step's results
into the next step. Timed that way, large prompt steps lost time to the decode steps around them: `bench
compare` read a colocated prefill FLOP rate of 128% of the matmul ceiling on 2x H200; with device time, one
H200 at rate 3 reads 76%.

On CUDA each step records an event on the compute stream before its inputs are staged and one after its
sampling is launched; its time is the device time between the two. That time starts when the device reached
the step, so it never includes time queued behind the step before. Steps are observed in order once their end
event has passed, so a step whose results the host never reads (a prompt chunk that samples nothing) counts
too, once it has run. On CPU a step computes in the calling thread: its time is the host's, taken at its end.

A decode step (no prompt tokens) that takes SLOW_STEP_S or more and SLOW_FACTOR times the mean of recent decode
steps is counted (`pdlaunch_engine_slow_decode_steps_total`) and logged, at most once per SLOW_LOG_EVERY_S: every
running stream waited that long for its next token, and nothing in a decode step is meant to take it (a host stall
inside the step, a kernel compiled on first use, a forward that fell back to eager). Prompt steps are long by
design and are not judged. `bench compare` reads the counter beside the token gaps the client saw.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pdlaunch.metrics.engine_steps import count_slow_decode_step, observe_step

Observe = Callable[[int, int, float], None]  # (requests, tokens, seconds)

log = logging.getLogger(__name__)

SLOW_STEP_S = 0.05  # a decode step at least this long ...
SLOW_FACTOR = 4.0  # ... and this many times the recent mean is slow
MEAN_WEIGHT = 0.05  # weight of the newest decode step in the recent mean
SLOW_LOG_EVERY_S = 10.0


class DeviceEvent(Protocol):
    """What the clock uses of `torch.cuda.Event(enable_timing=True)`."""

    def record(self) -> None: ...
    def query(self) -> bool: ...
    def elapsed_time(self, end_event: Any) -> float: ...  # milliseconds to a later event


def cuda_timing_event() -> DeviceEvent:
    return torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]


@dataclass
class StepMark:
    """One launched step, until it is observed."""

    requests: int
    tokens: int
    started: float  # host clock at its start (the CPU's time)
    begin: DeviceEvent | None  # recorded before its first launch (device events)


class StepClock:
    """Times steps and reports each to `observe`, in launch order: with device events from `event` (None: the
    host's clock)."""

    def __init__(self, event: Callable[[], DeviceEvent] | None, observe: Observe = observe_step,
                 slow: SlowDecodeSteps | None = None) -> None:
        self._event = event
        self._observe = observe
        self._slow = slow  # keeps the recent decode steps' mean
        self._open: deque[tuple[StepMark, DeviceEvent, DeviceEvent]] = deque()  # ended on the host, not yet seen
        # to end on the device: (step, begin, end)

    def begin(self, requests: int, tokens: int) -> StepMark:
        """Before the step's inputs are staged."""
        event = None
        if self._event is not None:
            event = self._event()
            event.record()
        return StepMark(requests, tokens, time.perf_counter(), event)

    def end(self, mark: StepMark) -> None:
        """After the step's last launch (its sampling, or its forward when nothing samples)."""
        if mark.begin is None:
            self._observe(mark.requests, mark.tokens, time.perf_counter() - mark.started)
            return
        assert self._event is not None
        end = self._event()
        end.record()
        self._open.append((mark, mark.begin, end))

    def collect(self) -> None:
        """Observe every step the device has finished (without waiting for the others)."""
        while self._open:
            mark, begin, end = self._open[0]
            if not end.query():
                return
            self._open.popleft()
            self._observe(mark.requests, mark.tokens, begin.elapsed_time(end) / 1000.0)

    @property
    def pending(self) -> int:
        """Steps ended on the host whose device work has not been seen to finish."""
        return len(self._open)

    @property
    def decode_step_s(self) -> float | None:
        """What the decode step in flight may take on the device (None before the second decode step, or without a
        SlowDecodeSteps): the lower of the recent mean and the latest step not counted slow. The arrival window
        waits on it while the device may have finished: the mean alone, after one stalled step (2 s: 5 ms steps read
        105 ms) or once the batch shrank, outlasted the steps for dozens of them, the device idle meanwhile. The
        first decode step is no estimate: with no mean to be judged slow against, a first-use stall there (a kernel
        compiled on its first launch) read as the steps' time and held the loop that long once more."""
        slow = self._slow
        if slow is None or slow.mean_s is None or slow.last_s is None:
            return None
        return min(slow.mean_s, slow.last_s)


class SlowDecodeSteps:
    """Counts and logs slow decode steps (the module doc); `now` is the clock the log's rate limit reads."""

    def __init__(self, count: Callable[[], None] = count_slow_decode_step,
                 now: Callable[[], float] = time.monotonic) -> None:
        self._count, self._now = count, now
        self.mean_s: float | None = None  # recent decode steps' mean
        self.last_s: float | None = None  # the latest decode step judged not slow (the first is not judged)
        self._unlogged = 0  # slow steps since the last log line
        self._longest_s = 0.0  # ... and the longest of them
        self._logged_at: float | None = None

    def observe(self, requests: int, tokens: int, seconds: float) -> None:
        if tokens > requests or requests == 0:
            return  # a step with prompt tokens
        mean = self.mean_s
        # every step joins the mean, slow ones too: a lasting change (a batch grown from 1 to 256) stops reading
        # as slow within a few dozen steps
        self.mean_s = seconds if mean is None else (1 - MEAN_WEIGHT) * mean + MEAN_WEIGHT * seconds
        if mean is None:
            return  # nothing to judge it against: neither counted slow nor taken as the steps' time (decode_step_s)
        if seconds < SLOW_STEP_S or seconds < SLOW_FACTOR * mean:
            self.last_s = seconds
            return
        self._count()
        self._unlogged += 1
        self._longest_s = max(self._longest_s, seconds)
        now = self._now()
        if self._logged_at is not None and now - self._logged_at < SLOW_LOG_EVERY_S:
            return
        log.info("%d slow decode step(s) since the last report, the longest %.0f ms (the last with %d requests, "
                 "against %.1f ms of recent decode steps): every running stream waited that long for its next token",
                 self._unlogged, self._longest_s * 1000, requests, mean * 1000)
        self._unlogged, self._longest_s, self._logged_at = 0, 0.0, now


def step_clock(device: torch.device) -> StepClock:
    """Device events on CUDA, the host clock elsewhere; each step observed by the step metrics and SlowDecodeSteps."""
    slow = SlowDecodeSteps()

    def observe(requests: int, tokens: int, seconds: float) -> None:
        observe_step(requests, tokens, seconds)
        slow.observe(requests, tokens, seconds)

    return StepClock(cuda_timing_event if device.type == "cuda" else None, observe, slow)
