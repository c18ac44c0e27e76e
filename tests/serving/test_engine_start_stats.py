"""An engine that was built but whose first stats (what /info shows from the start) fail: the instance fails with
that message, as a failed build does (engine_thread.py), instead of a thread that died with the state stuck at
"loading" and a server waiting for a ready that never comes; the built engine is shut down."""

from __future__ import annotations

from pdlaunch.engine.stats import EngineStats
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.test_engine_loop_idle import CountingEngine


class BrokenStatsEngine(CountingEngine):
    def __init__(self) -> None:
        super().__init__()
        self.shut_down = False

    def stats(self) -> EngineStats:
        raise RuntimeError("block pool unreadable")

    def shutdown(self) -> None:
        self.shut_down = True


def test_first_stats_failing_fails_the_instance_and_shuts_the_engine_down() -> None:
    engine = BrokenStatsEngine()
    fatal: list[str] = []
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001, quiescent_wait_s=0.01,  # type: ignore[arg-type,return-value]
                      on_fatal=fatal.append)
    loop.start()
    try:
        assert loop.wait_ready(30), "the engine loop to settle (ready or failed) after its start"
        assert loop.state == "failed", loop.state
        assert loop.error is not None and "engine failed to start" in loop.error
        assert "block pool unreadable" in loop.error
        assert fatal == [loop.error]
        assert engine.shut_down, "the engine built before the failure was not shut down"
    finally:
        loop.stop()
