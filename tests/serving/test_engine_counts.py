"""vLLM's counts of what the engine did, taken on the engine thread as its outputs come (engine_counts.py,
request_metrics.EngineTokens): a request nobody reads, or one aborted mid-stream, still counts every prompt and
generated token; a stop counts every request still open once as an abort (not again one counted before), in /info's
num_aborted_requests only: vllm:request_success{finished_reason="abort"} stays 0, as vLLM's (its frontend drops a
request its client aborted before the engine's outputs count). Here with an engine stand-in that knows what it
generated; the registry is the process's: deltas of this process's series."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import Counter

from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.engine.structured_output import StructuredOutput
from pdlaunch.metrics.vllm_series import GENERATION_TOKENS, PROMPT_TOKENS, REQUEST_SUCCESS, vllm
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.request_metrics import EngineTokens
from tests.serving.helpers import wait_for
from tests.serving.test_engine_loop_idle import CountingEngine

TIMEOUT = 60.0  # a loaded 2-core machine
HOLD = 0  # a prompt starting with it stays open once its tokens are out (it never finishes)
STRUCTURED = SamplingParams(max_tokens=3, structured_output=StructuredOutput(kind="choice", value='["yes", "no"]',
                                                                             field="guided_choice"))


@dataclass
class Scripted:
    num_prompt: int
    max_tokens: int
    hold: bool
    emitted: int = 0


class ScriptedEngine(CountingEngine):
    """Each request gets one token a step (admitted: scheduled_at set) up to its max_tokens, then ends by "length"
    unless its prompt starts with HOLD; `generated` counts what it made. Grammar builds wait for `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: dict[str, Scripted] = {}
        self.generated = 0
        self.release = threading.Event()
        self.building = threading.Semaphore(0)

    def check_kv_transfer_params(self, params: object) -> None:
        return None

    def grammar_matcher(self, spec: StructuredOutput) -> str:
        self.building.release()
        assert self.release.wait(TIMEOUT), "the test never released the grammar build"
        return "matcher"

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams, kv: object,
                    matcher: object = None) -> None:
        with self.lock:
            self.requests[request_id] = Scripted(len(prompt), params.max_tokens or 1, prompt[0] == HOLD)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        with self.lock:
            request = self.requests.pop(request_id, None)
        if request is None:
            return None
        return RequestOutput(request_id, [], "", [], "", finished=True, finish_reason="abort",
                             num_prompt_tokens=request.num_prompt)

    def has_unfinished_requests(self) -> bool:
        with self.lock:
            return any(r.emitted < r.max_tokens for r in self.requests.values())

    def step(self) -> list[object]:
        outputs: list[object] = []
        with self.lock:
            for request_id, r in list(self.requests.items()):
                if r.emitted == r.max_tokens:
                    continue
                r.emitted += 1
                self.generated += 1
                done = r.emitted == r.max_tokens and not r.hold
                if done:
                    del self.requests[request_id]
                outputs.append(RequestOutput(request_id, [7], "x", [7] * r.emitted, "x" * r.emitted, finished=done,
                                             finish_reason="length" if done else None, num_prompt_tokens=r.num_prompt,
                                             scheduled_at=time.monotonic()))
        return outputs


def sample(metric: Counter, **labels: str) -> float:
    """`metric` in this process's vllm:* series (their model_name: the instance last built in this worker, if any)."""
    value: float = vllm(metric, **labels)._value.get()
    return value


def counts() -> dict[str, float]:
    return {"prompt": sample(PROMPT_TOKENS), "generation": sample(GENERATION_TOKENS),
            "length": sample(REQUEST_SUCCESS, finished_reason="length"),
            "abort": sample(REQUEST_SUCCESS, finished_reason="abort"),
            "error": sample(REQUEST_SUCCESS, finished_reason="error")}


def delta(before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in counts().items()}


@pytest.fixture()
def engine() -> Iterator[ScriptedEngine]:
    engine = ScriptedEngine()
    yield engine
    engine.release.set()


def _started(engine: ScriptedEngine) -> EngineLoop:
    loop = EngineLoop(lambda: engine, idle_wait_s=0.001, quiescent_wait_s=0.01)  # type: ignore[arg-type,return-value]
    loop.start()
    assert loop.wait_ready(TIMEOUT), "the engine loop to start"
    return loop


def test_a_request_nobody_reads_counts_its_prompt_tokens_and_end(engine: ScriptedEngine) -> None:
    loop = _started(engine)
    try:
        before = counts()

        async def submit_and_leave() -> None:  # its event loop closes: nobody reads the stream
            loop.submit("r1", [1, 2, 3], SamplingParams(max_tokens=5))

        asyncio.run(submit_and_leave())
        wait_for(lambda: loop.num_pending == 0, "the engine to finish the request", TIMEOUT)
        assert delta(before) == {"prompt": 3, "generation": 5, "length": 1, "abort": 0, "error": 0}
    finally:
        loop.stop()


def test_a_request_aborted_mid_stream_counts_every_token_the_engine_made(engine: ScriptedEngine) -> None:
    loop = _started(engine)
    try:
        before = counts()

        async def run() -> None:
            loop.submit("r1", [HOLD, 2, 3, 4], SamplingParams(max_tokens=4))  # its outputs are never read
            await asyncio.to_thread(wait_for, lambda: engine.generated == 4, "the request's 4 tokens", TIMEOUT)
            loop.abort("r1")  # the client left

        asyncio.run(run())
        wait_for(lambda: loop.num_aborted == 1, "the abort to be counted", TIMEOUT)
        assert delta(before) == {"prompt": 4, "generation": 4, "length": 0, "abort": 0, "error": 0}
    finally:
        loop.stop()


def test_a_stop_counts_every_open_request_once_as_an_abort(engine: ScriptedEngine) -> None:
    loop = _started(engine)
    before = counts()

    async def run() -> None:
        loop.submit("done", [1, 2], SamplingParams(max_tokens=2))
        loop.submit("open", [HOLD, 2, 3], SamplingParams(max_tokens=2))
        loop.submit("left", [HOLD, 2], SamplingParams(max_tokens=1))
        await asyncio.to_thread(wait_for, lambda: engine.generated == 5, "the 5 tokens of 3 requests", TIMEOUT)
        loop.abort("left")
        await asyncio.to_thread(wait_for, lambda: loop.num_aborted == 1, "the abort of 'left'", TIMEOUT)
        for i in range(3):  # two builds hold both grammar threads, the third waits for one: stop() cancels it
            loop.submit(f"structured-{i}", [1, 2], STRUCTURED)
        for _ in range(2):
            assert await asyncio.to_thread(engine.building.acquire, True, TIMEOUT), "a build never started"
        await asyncio.to_thread(loop.stop, TIMEOUT)

    asyncio.run(run())
    assert loop.state == "stopped"
    # aborted: left once, open at the stop, the three structured ones the engine never took; none in request_success
    assert delta(before) == {"prompt": 2 + 3 + 2, "generation": 5, "length": 1, "abort": 0, "error": 0}
    assert loop.num_aborted == 5 and engine.requests == {}


def _output(tokens: int, scheduled: bool, reason: str | None = None) -> RequestOutput:
    return RequestOutput("r", [7] * tokens, "", [], "", finished=reason is not None, finish_reason=reason,
                         num_prompt_tokens=10, scheduled_at=1.0 if scheduled else None)


def test_a_pd_decodes_prompt_counts_at_its_first_output_after_admission() -> None:
    """A PD decode's first token, sampled by its prefill, comes before the scheduler admitted it: its prompt counts
    with its next output (the KV loaded), once."""
    tokens, before = EngineTokens(), counts()
    assert tokens.output(_output(1, scheduled=False)) == 1  # generated tokens: the caller adds them
    assert delta(before)["prompt"] == 0
    assert tokens.output(_output(2, scheduled=True)) == 2
    assert delta(before)["prompt"] == 10
    assert tokens.output(_output(1, scheduled=True, reason="stop")) == 1
    assert delta(before) == {"prompt": 10, "generation": 0, "length": 0, "abort": 0, "error": 0}


@pytest.mark.parametrize(("reason", "prompt"), [("error", 10), ("abort", 0)])
def test_an_end_without_a_token_after_admission_counts_the_prompt_unless_an_abort(reason: str, prompt: int) -> None:
    """vLLM adds a prompt with its request's first output, a token or not: an error that ended the request (a KV
    load that failed) counts it; an abort (its client left) does not, as vLLM drops a request its client aborted
    before any output of it counts."""
    tokens, before = EngineTokens(), counts()
    assert tokens.output(_output(0, scheduled=True, reason=reason)) == 0
    assert delta(before)["prompt"] == prompt
