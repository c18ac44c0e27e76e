"""The engine thread hands a step's outputs to the event loop in one call (one self-pipe wake-up a step, not one
per stream), and every stream still gets its items in order: Accepted, each token, the finished output."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.engine.stats import EngineStats
from pdlaunch.server.engine_loop import Accepted, EngineLoop

TOKENS = 5


class LockstepEngine:
    """Each step gives every added request one more token; a request finishes at TOKENS."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.lock = threading.Lock()
        self.steps_with_outputs = 0

    def check_kv_transfer_params(self, params: Any) -> None:
        return None

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams, kv: Any = None) -> None:
        with self.lock:
            self.requests[request_id] = 0

    def is_quiescent(self) -> bool:
        return not self.requests

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        outputs = []
        with self.lock:
            for rid in list(self.requests):
                n = self.requests[rid] = self.requests[rid] + 1
                outputs.append(RequestOutput(rid, [n], str(n), list(range(1, n + 1)), "", finished=n == TOKENS,
                                             finish_reason="length" if n == TOKENS else None))
                if n == TOKENS:
                    del self.requests[rid]
            self.steps_with_outputs += bool(outputs)
        return outputs

    def stats(self) -> EngineStats:
        return {"num_running": len(self.requests), "num_waiting": 0, "num_waiting_for_kv": 0,
                "num_blocks_total": 8, "num_blocks_used": 0}  # type: ignore[typeddict-item]

    def check_integrity(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def test_a_steps_outputs_reach_their_streams_in_one_call_into_the_event_loop() -> None:
    engine = LockstepEngine()
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001, quiescent_wait_s=0.05)  # type: ignore[arg-type,return-value]
    loop.start()
    assert loop.wait_ready(30), "the engine loop to start"

    async def run() -> tuple[dict[str, list[Any]], int]:
        event_loop = asyncio.get_running_loop()
        calls = [0]
        real = event_loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return real(*args, **kwargs)

        event_loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        streams = []
        for i in range(4):
            streams.append(loop.submit(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=TOKENS)))
        got: dict[str, list[Any]] = {}
        for stream in streams:
            items: list[Any] = []
            while not items or not getattr(items[-1], "finished", False):
                items.append(await asyncio.wait_for(stream.queue.get(), 30))
            got[stream.request_id] = items
        return got, calls[0]

    try:
        got, calls = asyncio.run(run())
    finally:
        loop.stop()
    for rid, items in got.items():
        assert isinstance(items[0], Accepted), (rid, items)
        assert [o.new_token_ids for o in items[1:]] == [[n] for n in range(1, TOKENS + 1)], (rid, items)
        assert items[-1].finished and not any(o.finished for o in items[1:-1])
    # 4 Accepted puts, then one call per step with outputs (not one per stream and step: 4 x 5 = 20).
    assert calls <= 4 + engine.steps_with_outputs, (calls, engine.steps_with_outputs)
    assert engine.steps_with_outputs < 4 * TOKENS
