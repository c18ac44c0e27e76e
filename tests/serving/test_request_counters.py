"""vllm:prompt_tokens and vllm:request_success{finished_reason="abort"} as an instance's /metrics shows them: the
prompt counts once its prefill ran (not when the request is accepted: a request aborted before it ran added its
prompt), once per sample with n > 1 as vLLM counts it, and a request the client left counts once in /info's
num_aborted_requests while request_success{finished_reason="abort"} stays where it was (vLLM's frontend drops a
request its client aborted before its outputs count); a request nobody reads counts its prompt, tokens and end all the
same (the engine thread counts them); the histograms of token counts have vLLM's 1-2-5 buckets up to max_model_len,
and vllm:request_prefill_kv_computed_tokens leaves out a prompt's prefix cache hit. Tiny model on CPU, in process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.metrics.vllm_series import NUM_REQUESTS_WAITING, TokenHistograms, vllm
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import in_process_instance, tiny_colocated, wait_for

PROMPT = "Counters count what ran"


@pytest.fixture(scope="module")
def instance() -> Iterator[tuple[str, EngineLoop]]:
    with in_process_instance(tiny_colocated(256), "test-request-counters-0") as served:
        yield served


def counter(url: str, name: str, reason: str | None = None) -> float:
    """`name`'s value on the instance's /metrics (of finished_reason `reason` when given), in this instance's series:
    the registry is the process's, and an instance run in this worker before may have left series of its own model."""
    ours = f'model_name="{vllm(NUM_REQUESTS_WAITING)._labelvalues[0]}"'
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        series, _, value = line.rpartition(" ")
        if (series.startswith(name + "{") and ours in series
                and (reason is None or f'finished_reason="{reason}"' in series)):
            return float(value)
    raise AssertionError(f"{name} ({reason}) is not on /metrics")


def aborted(url: str) -> int:
    """The instance's /info num_aborted_requests."""
    value: int = httpx.get(f"{url}/info", timeout=30).json()["num_aborted_requests"]
    return value


def test_a_prompt_of_n_samples_counts_once_per_sample_as_vllm(instance: tuple[str, EngineLoop]) -> None:
    url, _ = instance
    before = counter(url, "vllm:prompt_tokens_total")
    answer = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": PROMPT, "max_tokens": 3, "n": 3, "temperature": 1.0, "seed": 7})
    assert answer.status_code == 200, answer.text
    prompt_tokens = answer.json()["usage"]["prompt_tokens"]
    assert counter(url, "vllm:prompt_tokens_total") - before == 3 * prompt_tokens


def test_a_request_the_client_left_before_it_ran_counts_one_abort_in_info_only_and_no_prompt(
        instance: tuple[str, EngineLoop]) -> None:
    url, loop = instance
    seqs = loop.engine.scheduler.max_num_seqs

    def admit(limit: int) -> None:
        def set_limit(engine: LLMEngine) -> None:
            engine.scheduler.max_num_seqs = limit  # 0: the scheduler admits nothing, requests wait

        asyncio.run(loop.call(set_limit))

    prompt_before = counter(url, "vllm:prompt_tokens_total")
    aborts_before = counter(url, "vllm:request_success_total", "abort")
    info_before = aborted(url)
    admit(0)
    try:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200  # accepted: its stream began, it waits for the scheduler
        wait_for(lambda: loop.num_pending == 0, "the instance to abort the request its client left")
        wait_for(lambda: aborted(url) > info_before, "the abort to be counted in /info", timeout=10)
    finally:
        admit(seqs)
    assert aborted(url) - info_before == 1
    assert counter(url, "vllm:request_success_total", "abort") == aborts_before
    assert counter(url, "vllm:prompt_tokens_total") == prompt_before


def test_a_request_nobody_reads_counts_its_prompt_generated_tokens_and_success(
        instance: tuple[str, EngineLoop]) -> None:
    url, loop = instance
    names = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")
    before = [counter(url, name) for name in names] + [counter(url, "vllm:request_success_total", "length")]

    async def submit_and_leave() -> None:  # its event loop closes: no reader for any output
        loop.submit("unread", [5, 6, 7, 8, 9], SamplingParams(max_tokens=4, ignore_eos=True))

    asyncio.run(submit_and_leave())
    wait_for(lambda: loop.num_pending == 0, "the engine to finish the unread request")
    after = [counter(url, name) for name in names] + [counter(url, "vllm:request_success_total", "length")]
    assert [a - b for a, b in zip(after, before)] == [5, 4, 1]


def buckets(url: str, name: str) -> list[str]:
    """The `le` bounds of histogram `name` on the instance's /metrics, in this instance's series."""
    ours = f'model_name="{vllm(NUM_REQUESTS_WAITING)._labelvalues[0]}"'
    found = []
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "_bucket{") and ours in line:
            found.append(line.partition('le="')[2].partition('"')[0])
    return found


def test_the_token_count_histograms_have_vllms_1_2_5_buckets(instance: tuple[str, EngineLoop]) -> None:
    """vLLM buckets request_prompt_tokens, request_generation_tokens, request_prefill_kv_computed_tokens,
    request_params_max_tokens and request_max_num_generation_tokens alike: 1, 2, 5, 10, ... up to max_model_len (of
    this process's first engine, made in this worker by whichever test built one first)."""
    url, _ = instance
    names = ("vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:request_prefill_kv_computed_tokens",
             "vllm:request_params_max_tokens", "vllm:request_max_num_generation_tokens")
    found = {name: buckets(url, name) for name in names}
    bounds = [float(le) for le in found["vllm:request_params_max_tokens"][:-1]]
    one_two_five = [float(m * 10**e) for e in range(10) for m in (1, 2, 5)]
    assert len(bounds) >= 6 and bounds == one_two_five[:len(bounds)], bounds  # max_model_len >= 100 in tests
    assert found["vllm:request_params_max_tokens"][-1] == "+Inf"
    assert all(les == found["vllm:request_params_max_tokens"] for les in found.values()), found


@pytest.mark.parametrize(("max_model_len", "last"), [(100, 100), (256, 200), (2048, 2000)])
def test_the_token_count_buckets_run_up_to_max_model_len(max_model_len: int, last: int) -> None:
    """vLLM's build_1_2_5_buckets(max_model_len): the last bound is the largest 1-2-5 value not above it."""
    registry = CollectorRegistry()
    made = TokenHistograms.make(max_model_len, registry)
    for histogram in made.all():
        histogram.labels(model_name="m", engine="0")
    expected = [str(float(m * 10**e)) for e in range(5) for m in (1, 2, 5) if m * 10**e <= last] + ["+Inf"]
    for family in registry.collect():
        les = [s.labels["le"] for s in family.samples if s.name.endswith("_bucket")]
        assert les == expected, family.name
    assert len(list(registry.collect())) == len(made.all())


def test_prefill_kv_computed_tokens_leave_out_the_prefix_cache_hit(instance: tuple[str, EngineLoop]) -> None:
    """vllm:request_prefill_kv_computed_tokens: a request's prompt less its tokens found in the prefix cache, once
    per request; the second of two equal prompts finds the first's blocks."""
    url, _ = instance
    prompt = "Prefix caching reuses the blocks of a prompt seen before: " * 4
    name = "vllm:request_prefill_kv_computed_tokens"
    for _ in range(2):
        before = (counter(url, f"{name}_count"), counter(url, f"{name}_sum"))
        answer = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0.0})
        assert answer.status_code == 200, answer.text
        usage = answer.json()["usage"]
        computed = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
        after = (counter(url, f"{name}_count"), counter(url, f"{name}_sum"))
        assert (after[0] - before[0], after[1] - before[1]) == (1, computed)
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0, usage  # the second found the first's blocks
