"""Engine step times (engine/step_clock.py): device time per step, observed in launch order once the device has
run the step, never the host's view of where one step ends and the next begins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.step_clock import DeviceEvent, SlowDecodeSteps, StepClock, cuda_timing_event, step_clock
from pdlaunch.metrics.engine_steps import (
    ENGINE_SLOW_DECODE_STEPS,
    ENGINE_STEP_PATHS,
    ENGINE_STEP_SECONDS,
    ENGINE_STEP_TOKENS,
    ENGINE_STEPS,
    STEP_PATHS,
)
from tests.engine.conftest import MakeEngine, run_all


class Device:
    """A device timeline: work is queued in order and runs when the test says so."""

    def __init__(self) -> None:
        self.queued_ms = 0.0  # when the last queued work ends
        self.ran_ms = 0.0  # how far the device has run

    def queue(self, ms: float) -> None:
        self.queued_ms += ms


class FakeEvent:
    def __init__(self, device: Device) -> None:
        self.device = device
        self.at_ms: float | None = None

    def record(self) -> None:
        self.at_ms = self.device.queued_ms  # passes when the work queued before it has run

    def query(self) -> bool:
        assert self.at_ms is not None
        return self.device.ran_ms >= self.at_ms

    def elapsed_time(self, end_event: DeviceEvent) -> float:
        assert isinstance(end_event, FakeEvent) and self.at_ms is not None and end_event.at_ms is not None
        assert self.query() and end_event.query(), "elapsed_time of an event that has not passed"
        return end_event.at_ms - self.at_ms


def _clock(device: Device) -> tuple[StepClock, list[tuple[int, int, float]]]:
    seen: list[tuple[int, int, float]] = []
    return StepClock(lambda: FakeEvent(device), lambda r, t, s: seen.append((r, t, s))), seen


def _launch(clock: StepClock, device: Device, requests: int, tokens: int, ms: float) -> None:
    """One step staged now whose work takes `ms` on the device."""
    mark = clock.begin(requests, tokens)
    device.queue(ms)
    clock.end(mark)


def test_a_step_is_its_device_time_and_is_seen_once_the_device_ran_it() -> None:
    device = Device()
    clock, seen = _clock(device)
    _launch(clock, device, 4, 4, 5.0)
    _launch(clock, device, 5, 3076, 100.0)  # staged while the decode still runs: queued behind it
    clock.collect()
    assert seen == [] and clock.pending == 2  # nothing has run
    device.ran_ms = 50.0
    clock.collect()
    assert seen == [(4, 4, pytest.approx(0.005))] and clock.pending == 1
    device.ran_ms = 105.0
    clock.collect()
    assert seen[1] == (5, 3076, pytest.approx(0.100)) and clock.pending == 0


def test_steps_are_seen_in_launch_order_and_idle_device_time_is_not_counted() -> None:
    device = Device()
    clock, seen = _clock(device)
    _launch(clock, device, 1, 1, 2.0)
    device.ran_ms = device.queued_ms = 30.0  # idle until the next step is staged
    _launch(clock, device, 1, 1, 3.0)
    device.ran_ms = 33.0
    clock.collect()
    assert [s for _, _, s in seen] == [pytest.approx(0.002), pytest.approx(0.003)]


def test_without_device_events_the_host_clock_times_the_step_at_its_end() -> None:
    seen: list[tuple[int, int, float]] = []
    clock = StepClock(None, lambda r, t, s: seen.append((r, t, s)))
    mark = clock.begin(2, 9)
    clock.end(mark)
    assert len(seen) == 1 and seen[0][:2] == (2, 9) and seen[0][2] >= 0.0 and clock.pending == 0


def _counters() -> dict[str, tuple[float, float, float]]:
    return {kind: (ENGINE_STEPS.labels(kind=kind)._value.get(),
                   ENGINE_STEP_TOKENS.labels(kind=kind)._value.get(),
                   ENGINE_STEP_SECONDS.labels(kind=kind)._value.get()) for kind in ("prefill", "decode")}


def _paths() -> dict[str, float]:
    return {path: ENGINE_STEP_PATHS.labels(path=path)._value.get() for path in STEP_PATHS}


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
def test_every_engine_step_is_counted_once_with_its_tokens(llama_ckpt: Path, make_engine: MakeEngine,
                                                           overlap: bool) -> None:
    engine = make_engine(llama_ckpt, async_scheduling=overlap)
    before, paths = _counters(), _paths()
    out = run_all(engine, [[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].output_token_ids) == 4
    after = _counters()
    # each forward counted once, by how it ran (a CPU engine runs every step eagerly)
    assert {p: n - paths[p] for p, n in _paths().items()} == {"decode": 0, "rows": 0, "piecewise": 0, "eager": 4}
    steps, tokens, seconds = (a - b for a, b in zip(after["prefill"], before["prefill"]))
    assert (steps, tokens) == (1, 3) and seconds > 0
    steps, tokens, seconds = (a - b for a, b in zip(after["decode"], before["decode"]))
    assert (steps, tokens) == (3, 3) and seconds > 0
    assert engine.clock.pending == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_step_queued_behind_a_long_one_is_not_charged_for_it() -> None:
    seen: list[tuple[int, int, float]] = []
    clock = StepClock(cuda_timing_event, lambda r, t, s: seen.append((r, t, s)))
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start, stop = cuda_timing_event(), cuda_timing_event()
    long = clock.begin(1, 8192)
    start.record()
    for _ in range(40):
        a = (a @ a).clamp_(-1, 1)
    stop.record()
    clock.end(long)
    short = clock.begin(1, 1)  # begun on the host while the long step still runs
    b = a[:1] @ a
    clock.end(short)
    assert b.shape == (1, 4096)
    torch.cuda.synchronize()
    clock.collect()
    long_s, short_s = seen[0][2], seen[1][2]
    assert long_s == pytest.approx(start.elapsed_time(stop) / 1000.0, rel=0.1)
    assert short_s < long_s / 20


def test_a_decode_step_far_over_the_recent_ones_is_counted_and_logged_at_most_every_ten_seconds(
        caplog: pytest.LogCaptureFixture) -> None:
    counted: list[None] = []
    clock = [0.0]
    slow = SlowDecodeSteps(count=lambda: counted.append(None), now=lambda: clock[0])
    for _ in range(20):
        slow.observe(32, 32, 0.008)  # decode steps: 32 requests, a token each
    assert slow.mean_s == pytest.approx(0.008)
    slow.observe(32, 2080, 0.2)  # a prompt chunk beside the decodes: long by design, not judged
    slow.observe(32, 32, 0.03)  # 3.75x the mean but under 50 ms: not slow
    assert counted == []
    with caplog.at_level("INFO", logger="pdlaunch.engine.step_clock"):
        slow.observe(31, 31, 0.15)  # a stall every stream waited for
        clock[0] += 1.0
        slow.observe(31, 31, 0.18)  # counted, its line held back for ten seconds
        clock[0] += 10.0
        slow.observe(30, 30, 0.12)  # 4x the mean the two before raised
    assert len(counted) == 3
    lines = [r.getMessage() for r in caplog.records if "slow decode step" in r.getMessage()]
    assert lines[0].startswith("1 slow decode step(s) since the last report, the longest 150 ms")
    assert lines[1].startswith("2 slow decode step(s) since the last report, the longest 180 ms (the last with 30")
    assert len(lines) == 2
    for _ in range(60):  # a lasting change (a bigger batch) joins the mean and stops reading as slow
        slow.observe(256, 256, 0.06)
    assert len(counted) < 3 + 30 and slow.mean_s is not None and slow.mean_s > 0.05
    settled = len(counted)
    slow.observe(256, 256, 0.06)
    assert len(counted) == settled
    SlowDecodeSteps(count=lambda: counted.append(None)).observe(1, 1, 5.0)  # the first step sets the mean
    assert len(counted) == settled


def test_the_engines_clock_counts_slow_decode_steps_in_the_metrics() -> None:
    before = ENGINE_SLOW_DECODE_STEPS._value.get()  # noqa: SLF001
    clock = step_clock(torch.device("cpu"))
    for seconds in [0.004] * 10 + [0.5]:
        clock._observe(8, 8, seconds)  # noqa: SLF001
    assert ENGINE_SLOW_DECODE_STEPS._value.get() == before + 1  # noqa: SLF001
