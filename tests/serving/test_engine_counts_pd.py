"""A PD request that its first token ends (max_tokens 1, or a stop token sampled first) counts its end as it ended,
stop or length, on both instances, never as an abort: through the real proxy in front of a prefill and a decode
instance (tiny model, real NIXL on CPU, in this process), and when the decode instance stops between admitting such
a request (engine/engine_requests.py: the decode ends it at admission, from the prefill's token) and the step that
would hand its output out: that output is handed out then, and the request answered and counted as it ended. A PD
decode counts none of its prompt in vllm:request_prefill_kv_computed_tokens: it loaded the prompt's KV, all of it in
vllm:external_prefix_cache_hits; the NIXL histograms have the buckets of vLLM's NixlConnector. Both instances count
into this process's series (one model_name): deltas of both; /info's num_aborted_requests apiece."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.http.auth import internal_headers
from pdlaunch.metrics.vllm_series import REQUEST_SUCCESS
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.internal import KV_RELEASE_PATH
from pdlaunch.server.request_stream import Accepted
from tests.kv_transfer.deployment_secret import TEST_SECRET
from tests.serving.helpers import wait_for
from tests.serving.tiny_instances import TIMEOUT, TinyPD, serve_tiny, tiny_pd

PROMPT = "The capital of France is"
REASONS = ("stop", "length", "abort", "error")


@pytest.fixture(scope="module")
def deployment() -> Iterator[TinyPD]:
    with tiny_pd("counts-pd") as pd:
        yield pd


def _ends() -> dict[str, float]:
    """vllm:request_success by finished_reason, this process's instances' series (their model_name: "tiny")."""
    return {r: REQUEST_SUCCESS.labels(model_name="tiny", engine="0", finished_reason=r)._value.get()
            for r in REASONS}


def _delta(before: dict[str, float]) -> dict[str, float]:
    return {r: v - before[r] for r, v in _ends().items()}


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": PROMPT, "temperature": 0.0, "return_token_ids": True, **extra}


def _first_token(url: str) -> int:
    """The token greedy sampling takes first after PROMPT (asked of the instance at `url` alone)."""
    r = httpx.post(f"{url}/v1/completions", json=_body(max_tokens=1), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    token: int = r.json()["choices"][0]["token_ids"][0]
    return token


def _held_blocks_go(d: TinyPD) -> None:
    for url in (d.prefill, d.decode):
        wait_for(lambda: httpx.get(f"{url}/info").json()["num_blocks_used"] == 0, f"{url} to hold no KV", 60)


@pytest.mark.parametrize("reason", ["length", "stop"])
def test_a_pd_request_its_first_token_ends_counts_as_it_ended(deployment: TinyPD, reason: str) -> None:
    """The proxy's prefill leg (one token, its first token signed into its answer) ends by length, or by stop when
    the token it sampled is a stop token; the decode ends the request at admission from that token."""
    extra = {"max_tokens": 1} if reason == "length" else \
        {"max_tokens": 8, "stop_token_ids": [_first_token(deployment.decode)]}
    aborted = [loop.num_aborted for loop in deployment.loops]
    before = _ends()
    r = httpx.post(f"{deployment.proxy}/v1/completions", json=_body(**extra), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == reason
    # Each leg counted once the engine thread handed its output out (before its answer was sent).
    assert _delta(before) == {**dict.fromkeys(REASONS, 0), reason: 2}  # the prefill leg's end and the decode's
    assert [loop.num_aborted for loop in deployment.loops] == aborted
    _held_blocks_go(deployment)


def _prompt_sources() -> dict[str, float]:
    """Over this process's instances (model_name "tiny"): vllm:request_prefill_kv_computed_tokens' count and sum,
    vllm:external_prefix_cache_queries and _hits."""
    labels = {"model_name": "tiny", "engine": "0"}
    names = {"computed_count": "vllm:request_prefill_kv_computed_tokens_count",
             "computed_sum": "vllm:request_prefill_kv_computed_tokens_sum",
             "queries": "vllm:external_prefix_cache_queries_total", "hits": "vllm:external_prefix_cache_hits_total"}
    found = {key: REGISTRY.get_sample_value(name, labels) for key, name in names.items()}
    assert None not in found.values(), found
    return {key: float(value or 0) for key, value in found.items()}


def test_a_pd_decode_computes_none_of_the_prompt_its_prefill_sent(deployment: TinyPD) -> None:
    """vllm:request_prefill_kv_computed_tokens (a prompt less its tokens cached or loaded): the prefill leg computed
    the whole prompt (shorter than a block: no prefix hit), the decode none of it, as it loaded the prompt's KV
    (its first token's KV, a generated token's, is what it computes). Both asked their connector about the prompt
    (vllm:external_prefix_cache_queries); the decode's had all of it (_hits), the prefill's none."""
    before = _prompt_sources()
    r = httpx.post(f"{deployment.proxy}/v1/completions", json=_body(max_tokens=3), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    prompt = usage["prompt_tokens"]
    assert prompt < 8 and usage["prompt_tokens_details"]["cached_tokens"] == 0, usage
    delta = {key: value - before[key] for key, value in _prompt_sources().items()}
    # the prefill leg's and the decode's
    assert delta == {"computed_count": 2, "computed_sum": prompt, "queries": 2 * prompt, "hits": prompt}
    _held_blocks_go(deployment)


def _leg(d: TinyPD) -> dict[str, Any]:
    """A prefill leg of PROMPT as the proxy sends it: one token, signed into its answer for the decode."""
    leg = httpx.post(f"{d.prefill}/v1/completions", timeout=TIMEOUT, json=_body(
        max_tokens=1, kv_transfer_params={"do_remote_decode": True, "return_first_token": True}))
    assert leg.status_code == 200, leg.text
    params: dict[str, Any] = leg.json()["kv_transfer_params"]
    assert params.get("first_token_ids"), params
    return params


def _release(d: TinyPD, params: dict[str, Any]) -> None:
    """No decode reads the leg's KV: the prefill frees it now, as the proxy has it do."""
    released = httpx.post(f"{d.prefill}{KV_RELEASE_PATH}", json={"request_id": params["remote_request_id"]},
                          headers=internal_headers(TEST_SECRET), timeout=30)
    assert released.status_code == 200, released.text
    _held_blocks_go(d)


class Hold:
    """A call that holds the engine thread of `loop` until released: the commands sent meanwhile queue behind it."""

    def __init__(self, loop: EngineLoop) -> None:
        self.loop, self.running, self.go = loop, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(loop.call(self._hold, timeout=TIMEOUT)))
        self.thread.start()

    def _hold(self, engine: LLMEngine) -> None:
        self.running.set()
        assert self.go.wait(TIMEOUT), "the test never let the engine thread go on"

    def held(self) -> None:
        assert self.running.wait(TIMEOUT), "the engine thread to run the holding call"

    def queued(self, count: int, what: str) -> None:
        """Wait until `count` commands (`what`) queue behind the held call."""
        wait_for(lambda: self.loop._commands.qsize() == count, what, TIMEOUT)

    def release(self) -> None:
        self.go.set()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the holding call never returned"


def test_a_client_that_leaves_before_its_first_token_is_handed_out_counts_it_as_it_ended(
        deployment: TinyPD) -> None:
    """Its abort reaches the engine thread after the decode ended it at admission, before the step that hands its
    output out: the engine had ended it (nothing to abort), and that output counts its end."""
    loop = deployment.loops[1]
    params = _leg(deployment)
    ids = httpx.post(f"{deployment.decode}/tokenize", json={"model": "tiny", "prompt": PROMPT}, timeout=30).json()
    before = _ends()

    async def ask_and_leave() -> None:
        first = Hold(loop)
        second: Hold | None = None
        try:
            await asyncio.to_thread(first.held)
            stream = loop.submit("leaves", ids["tokens"], SamplingParams(max_tokens=1, temperature=0.0), params)
            second = Hold(loop)  # after the request: the thread admits it, then waits here, before any step
            await asyncio.to_thread(first.queued, 2, "the request and the second hold")
            await asyncio.to_thread(first.release)
            await asyncio.to_thread(second.held)
            assert isinstance(await asyncio.wait_for(stream.queue.get(), TIMEOUT), Accepted)
            loop.abort("leaves")  # the client leaves once the engine took its request
            await asyncio.to_thread(second.queued, 1, "the abort")
        finally:
            for hold in (first, second):
                if hold is not None:
                    await asyncio.to_thread(hold.release)

    asyncio.run(ask_and_leave())
    wait_for(lambda: not loop.counts.running, "the request's end to be counted", TIMEOUT)
    assert _delta(before) == {"stop": 0, "length": 1, "abort": 0, "error": 0}
    _release(deployment, params)


@pytest.fixture()
def decode() -> Iterator[tuple[str, EngineLoop]]:
    """A decode instance of the deployment's that the test stops."""
    srv, loop = serve_tiny("decode", "counts-pd-stopped-decode")
    try:
        yield srv.url, loop
    finally:
        loop.stop()
        srv.__exit__(None, None, None)


def test_a_decode_that_stops_before_handing_out_a_first_token_end_counts_that_end(
        deployment: TinyPD, decode: tuple[str, EngineLoop]) -> None:
    """The stop reaches the engine thread after it admitted a request that the prefill's first token ended, before
    the step that would hand its output out: handed out at the stop, the request is answered and counts its end."""
    url, loop = decode
    params = _leg(deployment)
    answer: list[httpx.Response] = []
    asking = threading.Thread(target=lambda: answer.append(httpx.post(
        f"{url}/v1/completions", json=_body(max_tokens=1, kv_transfer_params=params), timeout=TIMEOUT)))
    stopping = threading.Thread(target=loop.stop, args=(TIMEOUT,))
    before = _ends()
    hold = Hold(loop)
    try:
        hold.held()
        asking.start()
        hold.queued(1, "the decode request to be queued")
        stopping.start()  # its stop queues behind the request: the thread admits it, then stops
        hold.queued(2, "the stop to be queued")
    finally:
        hold.release()
    for thread in (stopping, asking):
        thread.join(TIMEOUT)
        assert not thread.is_alive(), f"{thread} still runs"
    assert loop.state == "stopped"
    assert _delta(before) == {"stop": 0, "length": 1, "abort": 0, "error": 0} and loop.num_aborted == 0
    assert answer[0].status_code == 200, answer[0].text  # answered, not the stop's 503
    assert answer[0].json()["choices"][0]["finish_reason"] == "length"
    _release(deployment, params)


def test_the_nixl_histograms_have_the_nixl_connectors_buckets(deployment: TinyPD) -> None:
    """vllm:nixl_xfer_time_seconds and vllm:nixl_bytes_transferred as vLLM's NixlConnector buckets them (0.13)."""
    expected = {"vllm:nixl_xfer_time_seconds": [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0],
                "vllm:nixl_bytes_transferred": [float(2 ** (10 + i)) for i in range(1, 25, 2)]}  # 2 KiB .. 8 GiB
    found: dict[str, list[float]] = {name: [] for name in expected}
    for line in httpx.get(f"{deployment.decode}/metrics", timeout=30).text.splitlines():
        name = line.partition("_bucket{")[0]
        if name in found and 'model_name="tiny"' in line:
            found[name].append(float(line.partition('le="')[2].partition('"')[0]))
    assert found == {name: [*bounds, float("inf")] for name, bounds in expected.items()}
