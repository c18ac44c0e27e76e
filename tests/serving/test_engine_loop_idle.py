"""The engine loop's idle waits: a quiescent engine is not stepped in a poll loop (an idle deployment
costs ~no CPU; the e2e figure is in test_new_user_e2e.py), a command still wakes it at once, and an
engine that holds or loads KV is stepped at the short poll interval."""

from __future__ import annotations

import asyncio
import threading

from pdlaunch.engine.stats import EngineStats
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import wait_for


class CountingEngine:
    """What the loop calls on an engine, counting steps; `quiescent` is what the test sets."""

    rank_engine_ids: list[str] = []  # what /info shows: the executor knows no ranks, no connector
    rank_nodes: list[str] = []
    connector = None

    def __init__(self) -> None:
        self.quiescent = True
        self.steps = 0
        self.lock = threading.Lock()

    def is_quiescent(self) -> bool:
        return self.quiescent

    def arrival_window_s(self) -> float:  # no device step in flight: the loop never waits for arrivals
        return 0.0

    def has_unfinished_requests(self) -> bool:
        return False

    def is_blocked(self) -> bool:  # never waits for KV blocks
        return False

    def step(self) -> list[object]:
        with self.lock:
            self.steps += 1
        return []

    def take_admitted(self) -> list[object]:  # no PD decode admitted with its first token
        return []

    def stats(self) -> EngineStats:
        return {"num_running": 0, "num_waiting": 0, "num_waiting_for_kv": 0, "num_blocks_total": 8,
                "num_blocks_used": 0}  # type: ignore[typeddict-item]

    def check_integrity(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def _loop(engine: CountingEngine) -> EngineLoop:
    # A quiescent wait far above any test timeout: only a command can make the loop step.
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001, quiescent_wait_s=600.0)  # type: ignore[arg-type,return-value]
    loop.start()
    assert loop.wait_ready(30), "the engine loop to start"
    return loop


def test_a_quiescent_engine_steps_only_when_a_command_comes() -> None:
    engine = CountingEngine()
    loop = _loop(engine)
    try:
        assert loop.stats is not None and engine.steps == 0  # /info has the blocks before any step
        async def calls() -> list[int]:
            return [await loop.call(lambda e: e.steps, timeout=30) for _ in range(20)]  # type: ignore[attr-defined]

        seen = asyncio.run(calls())  # each answered within the timeout: a command wakes the loop
        # At most one step between two commands, none without one: a command sent while the loop still drains the
        # queue (the answer to the one before reached the caller first) runs in the same drain, before the step.
        assert seen[0] == 0 and all(0 <= b - a <= 1 for a, b in zip(seen, seen[1:])), seen
        assert engine.steps <= len(seen), (engine.steps, seen)
        # A window with no command (what is measured here is that nothing happens, so it is a window, not a
        # wait for a condition): a loop polling at its 1 ms idle wait would step hundreds of times in it.
        before = engine.steps
        threading.Event().wait(1.0)
        assert engine.steps - before <= 1, f"{engine.steps - before} steps in 1 s of a quiescent engine"
    finally:
        loop.stop()


def test_an_engine_with_kv_work_is_polled_without_commands() -> None:
    engine = CountingEngine()
    engine.quiescent = False  # e.g. blocks held for a decode: their read notifications need polling
    loop = _loop(engine)
    try:
        wait_for(lambda: engine.steps >= 50, "50 steps of an engine that holds KV, with no command", 60)
    finally:
        loop.stop()
