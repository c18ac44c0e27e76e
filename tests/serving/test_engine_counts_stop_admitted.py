"""A stop hands out the outputs of PD decodes the engine admitted with their prefill's first token (take_admitted,
engine_thread._abort_open) before it aborts what is still open: one that first token ended is answered and counted as
it ended, one it did not end gets its token and then the stop's 503, counted once as an abort (/info's
num_aborted_requests; vllm:request_success counts no abort, as vLLM). Handing them out may fail: the stop goes on,
and each open request still ends once, as an abort. Here with an engine stand-in whose
take_admitted the test fills (test_engine_counts_pd.py runs the real engine's)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.retry_later import RetryLater
from pdlaunch.server.request_stream import Accepted, StreamItem
from tests.serving.helpers import wait_for
from tests.serving.test_engine_counts import HOLD, TIMEOUT, ScriptedEngine, _started, counts, delta


class AdmittingEngine(ScriptedEngine):
    """ScriptedEngine whose take_admitted hands out `admitted` once (or raises `fails`), as the engine's does."""

    def __init__(self) -> None:
        super().__init__()
        self.admitted: list[RequestOutput] = []
        self.fails: Exception | None = None
        self.shut_down = False

    def take_admitted(self) -> list[object]:
        if self.fails is not None:
            raise self.fails
        with self.lock:
            admitted, self.admitted = self.admitted, []
            for out in admitted:
                if out.finished:  # its first token ended it: the engine holds it no more
                    self.requests.pop(out.request_id, None)
        return list(admitted)

    def shutdown(self) -> None:
        self.shut_down = True


def _first(request_id: str, finished: bool) -> RequestOutput:
    return RequestOutput(request_id, [9], "y", [7, 9], "xy", finished=finished,
                         finish_reason="length" if finished else None, num_prompt_tokens=2, scheduled_at=None)


async def _items(queue: asyncio.Queue[StreamItem], last: Callable[[StreamItem], bool]) -> list[StreamItem]:
    items: list[StreamItem] = []
    while not items or not last(items[-1]):
        items.append(await asyncio.wait_for(queue.get(), TIMEOUT))
    return items


def _ends(item: StreamItem) -> bool:
    return isinstance(item, OpenAIError) or (isinstance(item, RequestOutput) and item.finished)


def test_a_stop_answers_admitted_outputs_and_aborts_the_rest_once() -> None:
    engine = AdmittingEngine()
    loop = _started(engine)
    before = counts()

    async def run() -> tuple[list[StreamItem], list[StreamItem]]:
        ended = loop.submit("ended", [HOLD, 2], SamplingParams(max_tokens=1))
        opened = loop.submit("opened", [HOLD, 2], SamplingParams(max_tokens=1))
        await asyncio.to_thread(wait_for, lambda: engine.generated == 2, "a token of each request", TIMEOUT)
        with engine.lock:
            engine.admitted = [_first("ended", finished=True), _first("opened", finished=False)]
        await asyncio.to_thread(loop.stop, TIMEOUT)
        return await _items(ended.queue, _ends), await _items(opened.queue, _ends)

    ended, opened = asyncio.run(run())
    assert loop.state == "stopped" and engine.shut_down
    assert isinstance(ended[0], Accepted) and isinstance(ended[-1], RequestOutput)
    assert ended[-1].finish_reason == "length", ended
    assert [type(i) for i in opened[1:]] == [RequestOutput, RequestOutput, RetryLater], opened  # with Retry-After
    assert isinstance(opened[-1], OpenAIError) and opened[-1].code == "shutting_down"
    assert delta(before) == {"prompt": 2 + 2, "generation": 2 + 2, "length": 1, "abort": 0, "error": 0}
    assert loop.num_aborted == 1 and not loop.counts.running


def test_a_stop_whose_hand_out_fails_still_ends_each_open_request_once() -> None:
    engine = AdmittingEngine()
    engine.fails = RuntimeError("injected take_admitted failure")
    loop = _started(engine)
    before = counts()

    async def run() -> list[list[StreamItem]]:
        streams = [loop.submit(name, [HOLD, 2], SamplingParams(max_tokens=1)) for name in ("a", "b")]
        await asyncio.to_thread(wait_for, lambda: engine.generated == 2, "a token of each request", TIMEOUT)
        await asyncio.to_thread(loop.stop, TIMEOUT)
        return [await _items(s.queue, _ends) for s in streams]

    ends = asyncio.run(run())
    assert loop.state == "stopped" and engine.shut_down
    assert all(isinstance(e[-1], OpenAIError) and e[-1].code == "shutting_down" for e in ends), ends
    assert delta(before) == {"prompt": 2 + 2, "generation": 2, "length": 0, "abort": 0, "error": 0}
    assert loop.num_aborted == 2 and not loop.counts.running and engine.requests == {}
