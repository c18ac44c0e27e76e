"""A PD decode whose KV load fails under kv_transfer.load_failure_policy fail (its prefill's hold was released before
the decode loaded it, as the proxy has a prefill do when no decode will read its KV) is answered 502 and counts its
end once as vllm:request_success{finished_reason="error"} on the decode's /metrics, as vLLM counts its
FinishReason.ERROR: not as an abort, and its prompt once in vllm:prompt_tokens (vLLM adds a prompt with its request's
first output, the load's error here, though its prompt was never computed here). Its
vllm:request_prefill_kv_computed_tokens is its whole prompt: none of its KV came (vLLM's, never admitted to run,
counts none as cached either). Real instances (tiny
model, real NIXL on CPU) in this process: the registry is the process's, both instances count into the series of
model_name "tiny"; the prefill leg ends before the counts are taken, so the delta is the decode's."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdlaunch.http.auth import internal_headers
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.internal import KV_RELEASE_PATH
from tests.kv_transfer.deployment_secret import TEST_SECRET
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.tiny_instances import MODEL, TIMEOUT, serve_tiny

PROMPT = "The capital of France is"
REASONS = ("stop", "length", "abort", "error")


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[str, str, EngineLoop]]:
    """The prefill's URL, the decode's URL and its engine loop."""
    servers: list[ThreadServer] = []
    try:
        prefill, _ = serve_tiny("prefill", "counts-pd-error-prefill", load_failure_policy="fail")
        servers.append(prefill)
        decode, loop = serve_tiny("decode", "counts-pd-error-decode", load_failure_policy="fail")
        servers.append(decode)
        yield prefill.url, decode.url, loop
    finally:
        for srv in reversed(servers):
            srv.__exit__(None, None, None)


def _scrape(url: str) -> dict[str, float]:
    """The instance's /metrics: vllm:request_success by finished_reason, vllm:prompt_tokens and the sum of
    vllm:request_prefill_kv_computed_tokens ("computed"), of MODEL's series."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.labels.get("model_name") != MODEL:
                continue
            if s.name == "vllm:request_success_total" and s.labels.get("finished_reason") in REASONS:
                found[s.labels["finished_reason"]] = s.value
            elif s.name == "vllm:prompt_tokens_total":
                found["prompt"] = s.value
            elif s.name == "vllm:request_prefill_kv_computed_tokens_sum":
                found["computed"] = s.value
    assert set(found) == {*REASONS, "prompt", "computed"}, f"series missing on {url}/metrics: {sorted(found)}"
    return found


def _post(url: str, max_tokens: int, kv: dict[str, Any]) -> httpx.Response:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "kv_transfer_params": kv}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT)


def _no_blocks(*urls: str) -> None:
    for url in urls:
        wait_for(lambda: httpx.get(f"{url}/info").json()["num_blocks_used"] == 0, f"{url} to hold no KV", 60)


def test_a_decode_whose_kv_load_failed_counts_one_error(pair: tuple[str, str, EngineLoop]) -> None:
    prefill, decode, loop = pair
    leg = _post(prefill, 1, {"do_remote_decode": True, "return_first_token": True})  # as the proxy's prefill leg
    assert leg.status_code == 200, leg.text
    params = leg.json()["kv_transfer_params"]
    released = httpx.post(f"{prefill}{KV_RELEASE_PATH}", json={"request_id": params["remote_request_id"]},
                          headers=internal_headers(TEST_SECRET), timeout=30)
    assert released.status_code == 200 and released.json()["released"] is True, released.text
    _no_blocks(prefill)  # the KV the decode would load is gone
    aborted = loop.num_aborted
    before = _scrape(decode)
    r = _post(decode, 4, params)
    assert r.status_code == 502 and "KV transfer failed" in r.json()["error"]["message"], r.text
    # The handler queued its abort before it answered (completions.serve): once a call queued after it has run, the
    # abort of the request that had ended with its error has counted nothing more.
    asyncio.run(loop.call(lambda engine: None, timeout=TIMEOUT, what="the commands queued before it"))
    prompt = leg.json()["usage"]["prompt_tokens"]  # the decode's prompt is the prefill's
    assert {k: v - before[k] for k, v in _scrape(decode).items()} == {**dict.fromkeys(before, 0), "error": 1,
                                                                    "prompt": prompt, "computed": prompt}
    assert loop.num_aborted == aborted and not loop.counts.running
    _no_blocks(prefill, decode)
