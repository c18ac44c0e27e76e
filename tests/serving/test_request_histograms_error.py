"""The histograms of a request's end (vllm:e2e_request_latency_seconds, request_prompt_tokens,
request_generation_tokens, request_prefill_kv_computed_tokens, request_params_n / max_tokens,
request_max_num_generation_tokens, request_inference_time, request_decode_time, request_time_per_output_token) count a
request the engine ended with "error" once, as vLLM records them for every request its engine finished, errors
included, whether the client reads the whole answer or a stream; a phase it never reached (no token: no decode time)
is not recorded, its time per output token is 0 (vLLM's with fewer than two tokens). A request its client left (an
abort) records none, as vLLM records none for a request its frontend aborted. Choices (server/choices.py) over an
engine stand-in (test_engine_counts_error.ErringEngine); the registry is the process's: deltas of this process's
series."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY, Histogram

from pdlaunch.http.errors import OpenAIError
from pdlaunch.metrics import vllm_series
from pdlaunch.server.choices import Choices
from pdlaunch.server.completion_request import CompletionRequest
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import wait_for
from tests.serving.test_engine_counts import HOLD, TIMEOUT, _started, counts, delta
from tests.serving.test_engine_counts_error import ErringEngine

MAX_MODEL_LEN = 256
MAX_TOKENS = 5


class Tokenizer:
    """What Choices asks of a tokenizer for prompts given as token ids: the text of a token."""

    def decode(self, ids: list[int], *args: object) -> str:
        return "x" * len(ids)


class ChoicesEngine(ErringEngine):
    """ErringEngine with what Choices reads of an engine."""

    max_model_len = MAX_MODEL_LEN
    longest_request = MAX_MODEL_LEN
    tokenizer = Tokenizer()


def token_histograms() -> vllm_series.TokenHistograms:
    """The process's TokenHistograms: made by its first engine, here when none was built in this worker yet."""
    if vllm_series.token_histograms() is None:
        vllm_series.engine_info(MAX_MODEL_LEN, {})
    tokens = vllm_series.token_histograms()
    assert tokens is not None
    return tokens


def _histograms() -> dict[str, Histogram]:
    tokens = token_histograms()
    return {"e2e": vllm_series.E2E_REQUEST_LATENCY, "prompt": tokens.prompt, "generation": tokens.generation,
            "computed": tokens.prefill_kv_computed, "n": vllm_series.REQUEST_PARAMS_N,
            "max_tokens": tokens.params_max_tokens, "max_gen": tokens.max_num_generation,
            "inference": vllm_series.REQUEST_INFERENCE_TIME, "decode": vllm_series.REQUEST_DECODE_TIME,
            "tpot": vllm_series.REQUEST_TIME_PER_OUTPUT_TOKEN}


def _sample(metric: Histogram, suffix: str) -> float:
    """`metric`'s _count or _sum in this process's vllm:* series (their model_name: the instance last built in this
    worker, if any)."""
    labels = dict(zip(metric._labelnames, vllm_series.vllm(metric)._labelvalues))
    value = REGISTRY.get_sample_value(f"{metric._name}_{suffix}", labels)
    assert value is not None, f"{metric._name}_{suffix} {labels} is not in the registry"
    return value


def observed() -> dict[str, float]:
    """Each histogram's count, and the token histograms' sums."""
    histograms = _histograms()
    found = {name: _sample(h, "count") for name, h in histograms.items()}
    for name in ("prompt", "generation", "computed", "n", "max_gen"):
        found[f"{name}_sum"] = _sample(histograms[name], "sum")
    return found


def observed_since(before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in observed().items()}


@pytest.fixture()
def loop() -> Iterator[tuple[EngineLoop, ChoicesEngine]]:
    engine = ChoicesEngine()
    loop = _started(engine)
    yield loop, engine
    engine.release.set()
    loop.stop()


def _choices(loop: EngineLoop, prompt: list[int], stream: bool) -> Choices:
    body = CompletionRequest.model_validate({"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS,
                                             "stream": stream})
    return Choices(loop, body, body.prompts(), "client", "m")


async def _stream(choices: Choices) -> list[bytes]:
    """The SSE events of a streamed answer (its error event last when it failed)."""
    await choices.start()
    return [event async for event in choices.events(include_usage=False)]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tokens", [0, 2])
def test_an_error_records_each_end_histogram_once(loop: tuple[EngineLoop, ChoicesEngine], tokens: int,
                                                  stream: bool) -> None:
    """`tokens`: made before the error. None: no decode or inference time (no token came), a time per output token
    of 0; two: each once. The prompt counts in vllm:prompt_tokens either way (its output after admission, an error or
    a token)."""
    engine_loop, engine = loop
    before, counted = observed(), counts()
    choices = _choices(engine_loop, [1, 2, 3], stream)
    engine.fail_after[choices.choices[0].request_id] = tokens

    async def answer() -> str:
        if stream:
            events = await _stream(choices)
            return events[-1].decode()
        await choices.start()
        with pytest.raises(OpenAIError) as raised:
            await choices.response()
        return raised.value.message

    error = asyncio.run(answer())
    assert "KV transfer failed" in error, error
    wait_for(lambda: not engine_loop.counts.running, "the request's end to be counted", TIMEOUT)
    phases = 1 if tokens else 0
    assert observed_since(before) == {
        "e2e": 1, "prompt": 1, "generation": 1, "computed": 1, "n": 1, "max_tokens": 1, "max_gen": 1,
        "inference": phases, "decode": phases, "tpot": 1, "prompt_sum": 3, "generation_sum": tokens,
        "computed_sum": 3, "n_sum": 1, "max_gen_sum": tokens}
    assert delta(counted) == {"prompt": 3, "generation": tokens, "length": 0, "abort": 0, "error": 1}


def test_an_abort_records_no_end_histogram(loop: tuple[EngineLoop, ChoicesEngine]) -> None:
    """A request its client left mid-stream records none; one read to its end (length) records each once."""
    engine_loop, engine = loop
    before, counted = observed(), counts()

    async def run() -> None:
        ended = _choices(engine_loop, [1, 2, 3], stream=True)
        await _stream(ended)
        left = _choices(engine_loop, [HOLD, 2, 3, 4], stream=True)  # never finishes: its client leaves
        await left.start()
        events = left.events(include_usage=False)
        for _ in range(2):
            await asyncio.wait_for(events.__anext__(), TIMEOUT)  # two tokens streamed
        await events.aclose()  # the client left: its choices are aborted

    asyncio.run(run())
    wait_for(lambda: engine_loop.num_aborted == 1, "the abort to be counted", TIMEOUT)
    assert observed_since(before) == {
        "e2e": 1, "prompt": 1, "generation": 1, "computed": 1, "n": 1, "max_tokens": 1, "max_gen": 1, "inference": 1,
        "decode": 1, "tpot": 1, "prompt_sum": 3, "generation_sum": MAX_TOKENS, "computed_sum": 3, "n_sum": 1,
        "max_gen_sum": MAX_TOKENS}
    # every token the engine made counts, the left one's too (those made before its abort was taken)
    # the abort counts in num_aborted_requests alone (above), not in request_success: vLLM never counts one there
    assert delta(counted) == {"prompt": 3 + 4, "generation": engine.generated, "length": 1, "abort": 0, "error": 0}
