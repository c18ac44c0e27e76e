"""vLLM's per-parent-request series (request_metrics.SampleGroup): vllm:request_params_n and
vllm:request_max_num_generation_tokens are observed once per prompt of a request, when the last of its samples (n > 1,
best_of) ended, with the request's n and the most tokens one sample generated, as vLLM observes them when its parent
request's last child finishes; none when a sample was aborted (its client left), as an aborted vLLM child never
finishes. Each sample's own end histograms (e2e, vllm:request_time_per_output_token_seconds, ...) count once per
sample, as vLLM counts each child. vllm:time_per_output_token_seconds (vLLM's deprecated, then removed, name of the
inter-token latency) is not exported. Choices (server/choices.py) over an engine stand-in; the registry is the
process's: deltas of this process's series (test_request_histograms_error.observed)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.metrics.vllm_series import LABELS, REQUEST_TIME_PER_OUTPUT_TOKEN, vllm
from pdlaunch.server import request_metrics
from pdlaunch.server.choices import Choices
from pdlaunch.server.completion_request import CompletionRequest
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.request_metrics import RequestMetrics
from tests.serving.helpers import wait_for
from tests.serving.test_engine_counts import TIMEOUT, _started
from tests.serving.test_request_histograms_error import ChoicesEngine, observed, observed_since

MAX_TOKENS = 8


class LengthsEngine(ChoicesEngine):
    """ChoicesEngine whose requests, in the order they come, generate `lengths` tokens each (None: held open once
    its max_tokens are out, until aborted); the rest their max_tokens."""

    def __init__(self, lengths: list[int | None]) -> None:
        super().__init__()
        self.lengths = list(lengths)

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams, kv: object,
                    matcher: object = None) -> None:
        super().add_request(request_id, prompt, params, kv, matcher)
        if not self.lengths:
            return
        length = self.lengths.pop(0)
        with self.lock:
            r = self.requests[request_id]
            r.max_tokens, r.hold = (r.max_tokens, True) if length is None else (length, False)


@pytest.fixture()
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[EngineLoop, LengthsEngine]]:
    engine = LengthsEngine(getattr(request, "param", []))
    loop = _started(engine)
    yield loop, engine
    engine.release.set()
    loop.stop()


def _choices(loop: EngineLoop, **body: Any) -> Choices:
    request = CompletionRequest.model_validate({"model": "m", "max_tokens": MAX_TOKENS, **body})
    return Choices(loop, request, request.prompts(), "client", "m")


async def _answer(choices: Choices, stream: bool) -> None:
    await choices.start()
    if stream:
        async for _ in choices.events(include_usage=False):
            pass
    else:
        await choices.response()


@pytest.mark.parametrize("engine", [[2, 5, 4]], indirect=True)
@pytest.mark.parametrize("stream", [False, True])
def test_n_is_observed_once_per_request_with_its_longest_sample(engine: tuple[EngineLoop, LengthsEngine],
                                                                stream: bool) -> None:
    engine_loop, _ = engine
    before = observed()
    asyncio.run(_answer(_choices(engine_loop, prompt=[1, 2, 3], n=3, stream=stream), stream))
    found = observed_since(before)
    assert (found["n"], found["n_sum"]) == (1, 3)  # once, not once per sample
    assert (found["max_gen"], found["max_gen_sum"]) == (1, 5)  # the longest of 2, 5 and 4 tokens
    # each sample's own end: once per sample, as vLLM's children
    assert (found["e2e"], found["generation"], found["generation_sum"], found["tpot"]) == (3, 3, 11, 3)
    assert found["max_tokens"] == 3


def test_each_prompt_of_a_list_is_a_parent_request(engine: tuple[EngineLoop, LengthsEngine]) -> None:
    engine_loop, _ = engine
    before = observed()
    asyncio.run(_answer(_choices(engine_loop, prompt=[[1, 2], [3, 4, 5]], n=2), stream=False))
    found = observed_since(before)
    assert (found["n"], found["n_sum"]) == (2, 4)
    assert (found["max_gen"], found["max_gen_sum"]) == (2, 2 * MAX_TOKENS)
    assert found["e2e"] == 4


@pytest.mark.parametrize("engine", [[1, 1, 3]], indirect=True)
def test_best_of_observes_n_once_over_all_its_samples(engine: tuple[EngineLoop, LengthsEngine]) -> None:
    """best_of 3, n 2: the request's n, once its three samples ended; the longest of all three (one not returned)."""
    engine_loop, _ = engine
    before = observed()
    asyncio.run(_answer(_choices(engine_loop, prompt=[1, 2, 3], n=2, best_of=3), stream=False))
    found = observed_since(before)
    assert (found["n"], found["n_sum"], found["max_gen"], found["max_gen_sum"]) == (1, 2, 1, 3)
    assert found["e2e"] == 3


@pytest.mark.parametrize("engine", [[1, None]], indirect=True)
def test_a_parent_with_an_aborted_sample_observes_no_n(engine: tuple[EngineLoop, LengthsEngine]) -> None:
    """The client leaves once the first sample ended: the second is aborted, its parent never finishes."""
    engine_loop, _ = engine
    before = observed()

    async def run() -> None:
        choices = _choices(engine_loop, prompt=[1, 2, 3], n=2, stream=True)
        await choices.start()
        events = choices.events(include_usage=False)
        while b'"finish_reason":"length"' not in (await asyncio.wait_for(events.__anext__(), TIMEOUT)).replace(
                b" ", b""):
            pass
        await events.aclose()  # the client left: the open sample is aborted

    asyncio.run(run())
    wait_for(lambda: engine_loop.num_aborted == 1, "the open sample's abort to be counted", TIMEOUT)
    found = observed_since(before)
    assert (found["n"], found["max_gen"]) == (0, 0)
    assert found["e2e"] == 1  # the sample that ended records its own end


class Clock:
    """time.monotonic() as the test sets it."""

    now = 0.0

    @classmethod
    def monotonic(cls) -> float:
        return cls.now


def _token_at(recorder: RequestMetrics, at: float, count: int, reason: str | None = None) -> None:
    Clock.now = at
    recorder.output(RequestOutput("r", [7] * count, "", [], "", finished=reason is not None, finish_reason=reason,
                                  num_prompt_tokens=4, scheduled_at=0.5))


def _tpot() -> tuple[float, float]:
    """vllm:request_time_per_output_token_seconds's (count, sum) in this process."""
    metric = vllm(REQUEST_TIME_PER_OUTPUT_TOKEN)
    labels = dict(zip(REQUEST_TIME_PER_OUTPUT_TOKEN._labelnames, metric._labelvalues))
    name = "vllm:request_time_per_output_token_seconds"
    count, total = REGISTRY.get_sample_value(f"{name}_count", labels), REGISTRY.get_sample_value(f"{name}_sum", labels)
    assert count is not None and total is not None, f"{name} {labels} is not in the registry"
    return count, total


def test_the_per_request_time_per_output_token_is_the_mean_after_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """First token at 1 s, then one at 2 s and two at 4 s: 3 s over the 3 tokens after the first, 1 s each. A
    request of one token observes 0 (vLLM's), in the same series; the old name is not exported."""
    monkeypatch.setattr(request_metrics, "time", Clock)
    count, total = _tpot()
    recorder = RequestMetrics("r", "completion", arrival=0.0)
    recorder.accepted(4)
    _token_at(recorder, 1.0, 1)
    _token_at(recorder, 2.0, 1)
    _token_at(recorder, 4.0, 2, reason="length")
    assert _tpot() == (count + 1, pytest.approx(total + 1.0))
    single = RequestMetrics("r", "completion", arrival=0.0)
    single.accepted(4)
    _token_at(single, 1.0, 1, reason="length")
    assert _tpot() == (count + 2, pytest.approx(total + 1.0))
    labels = dict(zip(LABELS, vllm(REQUEST_TIME_PER_OUTPUT_TOKEN)._labelvalues))
    assert REGISTRY.get_sample_value("vllm:time_per_output_token_seconds_count", labels) is None
