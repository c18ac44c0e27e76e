"""The instance server over real HTTP with a real LLMEngine on the demo model (colocated role)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.http.auth import internal_headers
from pdlaunch.http.sse import parse_sse
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import in_process_instance, wait_for

PROMPT = "The capital of France is"
SECRET = "test-deployment-secret-0123456789"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, EngineLoop]]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": 2048}, "cache": {"num_gpu_blocks": 160},
        "scheduler": {"max_num_seqs": 8}, "security": {"deployment_secret": SECRET},
    })
    with in_process_instance(cfg, "test-colocated-0", max_pending_requests=64) as (url, loop):
        yield url, loop


def _greedy(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0.0, **extra}


def test_health_info_models_metrics(server: tuple[str, EngineLoop]) -> None:
    url, _ = server
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    info = httpx.get(f"{url}/info").json()
    assert info["role"] == "colocated" and info["engine_id"] == "test-colocated-0"
    assert info["rank_engine_ids"] == ["test-colocated-0"] and info["tp_size"] == 1
    assert info["num_blocks_total"] == 160 and "block-major" in info["kv_layout"].replace("_", "-")
    models = httpx.get(f"{url}/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 2048
    # vLLM's model card: created is the listing's time (0 read as 1970 in clients that show it), parent null
    assert abs(models["data"][0]["created"] - time.time()) < 600 and models["data"][0]["parent"] is None
    httpx.post(f"{url}/v1/completions", json=_greedy(stream=True), timeout=60)
    text = httpx.get(f"{url}/metrics").text
    for name in ("pdlaunch_kv_blocks_total", "pdlaunch_requests_running", "pdlaunch_time_to_first_token_seconds",
                 "pdlaunch_inter_token_latency_seconds"):
        assert name in text
    assert "pdlaunch_time_to_first_token_seconds_count 0.0" not in text


def test_completion_matches_the_engine_and_stream_matches_whole(server: tuple[str, EngineLoop]) -> None:
    url, loop = server
    whole = httpx.post(f"{url}/v1/completions", json=_greedy(), headers={"X-Request-Id": "abc"}, timeout=60)
    assert whole.status_code == 200 and whole.headers["x-request-id"] == "abc"
    body = whole.json()
    assert body["id"] == "cmpl-abc" and body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("length", "stop")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    events = parse_sse(httpx.post(f"{url}/v1/completions", json=_greedy(stream=True), timeout=60).content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert not any("usage" in c for c in chunks)  # not asked for (vLLM's)

    events = parse_sse(httpx.post(f"{url}/v1/completions", timeout=60,
                                  json=_greedy(stream=True, stream_options={"include_usage": True})).content)
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"] == {**usage, "prompt_tokens_details": last["usage"][
        "prompt_tokens_details"]}

    ids = loop.engine.tokenizer.encode(PROMPT)
    by_ids = httpx.post(f"{url}/v1/completions", json=_greedy(prompt=ids, return_token_ids=True), timeout=60).json()
    assert by_ids["choices"][0]["text"] == choice["text"]
    output_ids = by_ids["choices"][0]["token_ids"]
    assert len(output_ids) == usage["completion_tokens"]
    events = parse_sse(httpx.post(f"{url}/v1/completions", timeout=60,
                                  json=_greedy(prompt=ids, return_token_ids=True, stream=True)).content)
    assert [t for e in events[:-1] for t in json.loads(e)["choices"][0]["token_ids"]] == output_ids


def test_chat_uses_the_template_and_streams_the_same_text(server: tuple[str, EngineLoop]) -> None:
    url, loop = server
    messages = [{"role": "user", "content": "Name three colors."}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 10, "temperature": 0.0}
    whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    expected_prompt = len(loop.engine.tokenizer.encode(
        loop.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False))
    assert whole["object"] == "chat.completion" and whole["usage"]["prompt_tokens"] == expected_prompt
    message = whole["choices"][0]["message"]
    assert message["role"] == "assistant"
    events = parse_sse(httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60).content)
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]


def test_logprobs_and_stop(server: tuple[str, EngineLoop]) -> None:
    url, _ = server
    body = httpx.post(f"{url}/v1/completions", json=_greedy(logprobs=2), timeout=60).json()
    logprobs = body["choices"][0]["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == n
    assert all(lp <= 0.0 for lp in logprobs["token_logprobs"]) and all(len(t) <= 2 for t in logprobs["top_logprobs"])
    full = httpx.post(f"{url}/v1/completions", json=_greedy(), timeout=60).json()["choices"][0]["text"]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = httpx.post(f"{url}/v1/completions", json=_greedy(stop=[stop]), timeout=60).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[:full.index(stop)]


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"prompt": "x " * 2100, "max_tokens": 8}, 400, "prompt"),
    ({"prompt": [], "max_tokens": 8}, 400, "prompt"),
    ({"prompt": [10**9], "max_tokens": 8}, 400, "prompt"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "model": "other"}, 404, "model"),
])
def test_bad_requests_are_openai_errors_naming_the_param(server: tuple[str, EngineLoop], body: dict,
                                                         status: int, param: str) -> None:
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_sleep_routes_refuse_without_sleep_mode(server: tuple[str, EngineLoop]) -> None:
    url, _ = server
    for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping")):
        anonymous = httpx.request(method, f"{url}{path}")
        assert anonymous.status_code == 403 and "--api-key" in anonymous.json()["error"]["message"]
        r = httpx.request(method, f"{url}{path}", headers=internal_headers(SECRET))
        if path == "/is_sleeping":  # as vLLM: an instance that cannot sleep is not sleeping
            assert r.status_code == 200 and r.json() == {"is_sleeping": False}
            continue
        assert r.status_code == 400 and "sleep mode is not enabled" in r.json()["error"]["message"]


def test_client_disconnect_aborts_and_frees_blocks(server: tuple[str, EngineLoop]) -> None:
    url, loop = server
    aborted = loop.num_aborted
    # Far more tokens than can be generated before the disconnect lands, even on a loaded machine.
    body = _greedy(max_tokens=2000, ignore_eos=True, stream=True)
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert next(r.iter_bytes()).startswith(b"data: ")
    wait_for(lambda: loop.num_pending == 0, "the server to drop the request")
    wait_for(lambda: loop.num_aborted == aborted + 1, "the engine to abort the request (not run it to its end)")
    wait_for(lambda: httpx.get(f"{url}/info").json()["num_blocks_used"] == 0, "the blocks to be freed")
    asyncio.run(loop.call(lambda engine: engine.check_integrity()))  # on the engine thread


def test_engine_step_params_reach_the_engine(server: tuple[str, EngineLoop]) -> None:
    url, loop = server
    seeded = _greedy(temperature=1.0, seed=7, max_tokens=8)
    a, b = (httpx.post(f"{url}/v1/completions", json=seeded, timeout=60).json()["choices"][0]["text"] for _ in "ab")
    assert a == b
    ignored = httpx.post(f"{url}/v1/completions", json=_greedy(max_tokens=20, ignore_eos=True), timeout=60).json()
    assert ignored["usage"]["completion_tokens"] == 20
    assert SamplingParams(max_tokens=20, ignore_eos=True).ignore_eos
