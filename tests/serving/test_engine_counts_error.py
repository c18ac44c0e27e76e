"""A request the engine ends with finish_reason "error" (its KV load failed under load_failure_policy fail, its
constraints left no token, its own sampling work raised: vLLM's FinishReason.ERROR) counts its end once as
vllm:request_success{finished_reason="error"} (engine_counts.EngineCounts.counted), not as an abort, and its prompt
once, with its first output after admission, a token or the error itself (vLLM adds a prompt with its request's first
output, with or without a token). Its client leaving after the error and the server's stop count nothing more. Here
with an engine stand-in (test_engine_counts.ScriptedEngine); the registry is the process's: deltas of this process's
series (test_engine_counts.counts)."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.server.request_stream import Accepted, StreamItem, error_of
from tests.serving.helpers import wait_for
from tests.serving.test_engine_counts import TIMEOUT, ScriptedEngine, _started, counts, delta


class ErringEngine(ScriptedEngine):
    """ScriptedEngine that ends each request named in `fail_after` with "error" (a 502, no token) once it made that
    many tokens, as the engine ends a decode whose KV load failed (engine_step.py: an output with no token)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_after: dict[str, int] = {}

    def step(self) -> list[object]:
        failed: list[object] = []
        with self.lock:
            for request_id, after in list(self.fail_after.items()):
                r = self.requests.get(request_id)
                if r is None or r.emitted != after:
                    continue
                del self.requests[request_id], self.fail_after[request_id]
                failed.append(RequestOutput(request_id, [], "", [7] * r.emitted, "x" * r.emitted, finished=True,
                                            finish_reason="error", error="KV transfer failed: injected",
                                            error_status=502, num_prompt_tokens=r.num_prompt,
                                            scheduled_at=time.monotonic()))  # admitted: its prompt counts
        return failed + super().step()


async def _read_to_end(queue: asyncio.Queue[StreamItem]) -> list[StreamItem]:
    """The stream's items up to its finished output."""
    items: list[StreamItem] = []
    while not (items and isinstance(items[-1], RequestOutput) and items[-1].finished):
        items.append(await asyncio.wait_for(queue.get(), TIMEOUT))
    return items


@pytest.mark.parametrize("tokens", [0, 2])
def test_an_error_counts_once_as_an_error_with_its_prompt_once(tokens: int) -> None:
    """`tokens`: made before the error. None: the prompt counted with the error; two: once, with the first token."""
    engine = ErringEngine()
    engine.fail_after["r"] = tokens
    loop = _started(engine)
    try:
        before = counts()

        async def run() -> list[StreamItem]:
            items = await _read_to_end(loop.submit("r", [1, 2, 3], SamplingParams(max_tokens=5)).queue)
            loop.abort("r")  # the client leaves after its error: nothing more to count
            return items

        items = asyncio.run(run())
        assert isinstance(items[0], Accepted) and len(items) == 1 + tokens + 1, items
        error = error_of(items[-1])
        assert error.status == 502 and "KV transfer failed" in error.message, error
        wait_for(lambda: not loop.counts.running, "the request's end to be counted", TIMEOUT)
        expected = {"prompt": 3, "generation": tokens, "length": 0, "abort": 0, "error": 1}
        assert delta(before) == expected
    finally:
        loop.stop()
    assert loop.state == "stopped"
    assert delta(before) == expected and loop.num_aborted == 0  # the stop after the error counted none again
