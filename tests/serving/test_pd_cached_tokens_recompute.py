"""usage.prompt_tokens_details.cached_tokens through PD when the decode does not use the prefill's KV: its load
failed (PDLAUNCH_TEST_FAIL_TRANSFER_RATE) or its params had expired, and with kv_transfer.load_failure_policy
recompute it computed the prompt itself. The count is then what this request reused: the decode's own prefix-cache
hits, not the prefill's (which the proxy reports when the KV did come over: test_pd_cached_tokens.py). Real
instances (tiny model, real NIXL on CPU) behind the real proxy, in this process; whole answers and streams (the usage
chunk, asked for by `stream_options.include_usage`), completions and chat."""

from __future__ import annotations

import gc
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from pdlaunch.http.auth import internal_headers
from pdlaunch.http.sse import parse_sse
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.server.app import build_app
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.internal import KV_RELEASE_PATH
from tests.kv_transfer.deployment_secret import TEST_SECRET, signed
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_vllm_proxies import _instance

BS = 8  # the instances' block_size
DECODE_HELD = 2 * BS  # the decode holds the prompt's first two blocks before the PD request


@dataclass
class Deployment:
    prefill: str
    decode: str
    proxy: str
    loops: dict[str, EngineLoop]


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    servers: list[ThreadServer] = []
    loops: dict[str, EngineLoop] = {}
    try:
        for role in ("prefill", "decode"):
            cfg, spec, loop = _instance(role)  # load_failure_policy: recompute (the default)
            loops[role] = loop
            srv = ThreadServer(build_app(loop, cfg, spec), spec.port).__enter__()
            servers.append(srv)
            wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 200, f"the {role} engine", 180)
        pool = InstancePool([Instance("prefill", servers[0].url, "prefill-0"),
                             Instance("decode", servers[1].url, "decode-0")])
        app = build_proxy_app(pool, 120.0, deployment_secret=TEST_SECRET)
        proxy = ThreadServer(app, PortAllocator("127.0.0.1").free("proxy")).__enter__()
        servers.append(proxy)
        wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see both instances")
        yield Deployment(servers[0].url, servers[1].url, proxy.url, loops)
    finally:
        for srv in reversed(servers):
            srv.__exit__(None, None, None)
        loops.clear()
        gc.collect()  # the engines (and their NIXL agents) go with the module, not at interpreter exit


def _body(path: str, seed: int, **extra: Any) -> dict[str, Any]:
    """A request of its own prompt (`seed`): 45 token ids, or a chat message of about as many tokens."""
    words = random.Random(seed).sample(["red", "green", "blue", "river", "stone", "cloud", "paper", "light", "north",
                                        "glass", "table", "music", "winter", "garden", "silver", "window"], 12)
    prompt: dict[str, Any] = {"messages": [{"role": "user", "content": " ".join(words * 2)}]} if "chat" in path \
        else {"prompt": random.Random(seed).sample(range(3, 500), 45)}
    return {"model": "tiny", "max_tokens": 4, "temperature": 0.0, "ignore_eos": True, **prompt, **extra}


def _prompt_ids(url: str, body: dict[str, Any]) -> list[int]:
    if "prompt" in body:
        ids: list[int] = body["prompt"]
        return ids
    r = httpx.post(f"{url}/tokenize", json={"model": "tiny", "messages": body["messages"]}, timeout=30)
    assert r.status_code == 200, r.text
    tokens: list[int] = r.json()["tokens"]
    return tokens


def _warm(d: Deployment, path: str, body: dict[str, Any]) -> int:
    """The prefill's cache holds the whole prompt, the decode's its first DECODE_HELD tokens; the prefill's count."""
    ids = _prompt_ids(d.decode, body)
    assert len(ids) > 3 * BS
    held = httpx.post(f"{d.decode}/v1/completions", timeout=120,
                      json={"model": "tiny", "prompt": ids[:DECODE_HELD], "max_tokens": 1})
    assert held.status_code == 200, held.text
    alone = _one_token(body)
    first = httpx.post(f"{d.prefill}{path}", json=alone, timeout=120)
    assert first.status_code == 200, first.text
    again = httpx.post(f"{d.prefill}{path}", json=alone, timeout=120)
    cached: int = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > DECODE_HELD  # the prefill's count differs from the decode's
    return cached


def _one_token(body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """`body` as a whole answer of one token."""
    return {**{k: v for k, v in body.items() if k not in ("stream", "stream_options")}, "max_tokens": 1, **extra}


def _answer(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The usage the client got, and whether anything it got carried kv_transfer_params."""
    r = httpx.post(f"{url}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        whole: dict[str, Any] = r.json()
        return {"usage": whole["usage"], "kv_transfer_params": "kv_transfer_params" in whole}
    events = parse_sse(r.content)
    assert events[-1] == "[DONE]", events
    chunks = [json.loads(e) for e in events[:-1]]
    [usage] = [c["usage"] for c in chunks if c.get("usage")]
    return {"usage": usage, "kv_transfer_params": any("kv_transfer_params" in c for c in chunks)}


def _recomputes() -> float:
    return REGISTRY.get_sample_value("pdlaunch_kv_load_recomputes_total") or 0.0


STREAMS = [None, {"include_usage": True}]
STREAM_IDS = ["whole", "usage-chunk"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", STREAMS, ids=STREAM_IDS)
def test_a_decode_that_recomputed_the_prompt_reports_its_own_cached_tokens(
        deployment: Deployment, path: str, stream: dict[str, bool] | None) -> None:
    d = deployment
    seed = 100 * STREAMS.index(stream) + ("chat" in path)
    extra: dict[str, Any] = {} if stream is None else {"stream": True, "stream_options": stream}
    body = _body(path, seed, **extra)
    _warm(d, path, body)
    faults = d.loops["decode"].engine.connector.receiver.faults
    faults.rate = 1.0  # PDLAUNCH_TEST_FAIL_TRANSFER_RATE=1.0: every KV load fails
    try:
        before = _recomputes()
        got = _answer(d.proxy, path, body)
    finally:
        faults.rate = 0.0
    assert _recomputes() == before + 1, "the decode computed the prompt itself"
    assert got["usage"]["prompt_tokens_details"] == {"cached_tokens": DECODE_HELD}, got
    assert not got["kv_transfer_params"], "the decode's word to the proxy does not reach the client"


def test_with_the_kv_loaded_the_prefill_s_count_stands(deployment: Deployment) -> None:
    d = deployment
    body = _body("/v1/completions", 7)
    prefill_cached = _warm(d, "/v1/completions", body)
    before = _recomputes()
    got = _answer(d.proxy, "/v1/completions", body)
    assert _recomputes() == before
    assert got["usage"]["prompt_tokens_details"] == {"cached_tokens": prefill_cached}, got


@pytest.mark.parametrize("stream", STREAMS, ids=STREAM_IDS)
def test_expired_params_computed_here_say_so(deployment: Deployment, stream: dict[str, bool] | None) -> None:
    """Params past their lease (recompute policy): the decode computes the prompt and its answer (the event with the
    usage, in a stream) says so, for the proxy to keep its count."""
    d = deployment
    body = _body("/v1/completions", 1000 + STREAMS.index(stream))
    if stream is not None:
        body.update(stream=True, stream_options=stream)
    _warm(d, "/v1/completions", body)
    leg = _one_token(body, kv_transfer_params={"do_remote_decode": True})
    params = httpx.post(f"{d.prefill}/v1/completions", json=leg, timeout=120).json()["kv_transfer_params"]
    released = httpx.post(f"{d.prefill}{KV_RELEASE_PATH}", json={"request_id": params["remote_request_id"]},
                          headers=internal_headers(TEST_SECRET), timeout=30)
    assert released.status_code == 200, released.text  # the decode will not read them: not held for the lease
    expired = signed({k: v for k, v in params.items() if k not in ("signature", "expires_at")},
                     lease_seconds=30.0, now=time.time() - 120)
    r = httpx.post(f"{d.decode}/v1/completions", json={**body, "kv_transfer_params": expired}, timeout=120)
    assert r.status_code == 200, r.text
    events = [r.json()] if stream is None else [json.loads(e) for e in parse_sse(r.content)[:-1]]
    [marked] = [e for e in events if e.get("usage")]
    assert marked["kv_transfer_params"] == {"prompt_recomputed": True}, marked
    assert marked["usage"]["prompt_tokens_details"] == {"cached_tokens": DECODE_HELD}


def _expired(d: Deployment, body: dict[str, Any]) -> dict[str, Any]:
    """Params of `body`'s prefill leg, signed again as past their lease (its hold released: nothing reads it)."""
    leg = _one_token(body, kv_transfer_params={"do_remote_decode": True})
    params = httpx.post(f"{d.prefill}/v1/completions", json=leg, timeout=120).json()["kv_transfer_params"]
    released = httpx.post(f"{d.prefill}{KV_RELEASE_PATH}", json={"request_id": params["remote_request_id"]},
                          headers=internal_headers(TEST_SECRET), timeout=30)
    assert released.status_code == 200, released.text
    return signed({k: v for k, v in params.items() if k not in ("signature", "expires_at")}, lease_seconds=30.0,
                  now=time.time() - 120)


def test_expired_params_computed_here_count_one_recompute(deployment: Deployment) -> None:
    d = deployment
    body = _body("/v1/completions", 1100)
    expired = _expired(d, body)
    before = _recomputes()
    r = httpx.post(f"{d.decode}/v1/completions", json={**body, "kv_transfer_params": expired}, timeout=120)
    assert r.status_code == 200, r.text
    assert _recomputes() == before + 1


@pytest.mark.parametrize("refusal", ["overloaded", "prompt-too-long"])
def test_a_refused_request_with_expired_params_counts_no_recompute(deployment: Deployment, refusal: str) -> None:
    """A decode leg whose params had expired, refused by the server (overloaded at its submit, a 503; a 400 before
    it): it computes nothing here, so pdlaunch_kv_load_recomputes_total stays. The check of its params counted one
    as they were parsed: at submit, or in the server's release of its prefill's hold (release_unsubmitted)."""
    d = deployment
    loop = d.loops["decode"]
    body = _body("/v1/completions", 1200)
    expired = _expired(d, body)
    if refusal == "prompt-too-long":
        body["prompt"] = body["prompt"] * 20  # 900 tokens: past max_model_len (512)
    before = _recomputes()
    limit = loop.max_pending_requests
    loop.max_pending_requests = 0 if refusal == "overloaded" else limit
    try:
        r = httpx.post(f"{d.decode}/v1/completions", json={**body, "kv_transfer_params": expired}, timeout=120)
    finally:
        loop.max_pending_requests = limit
    assert r.status_code == (503 if refusal == "overloaded" else 400), r.text
    wait_for(lambda: not loop._releases, "the server's release of the refused leg's params", 60)  # noqa: SLF001
    assert _recomputes() == before
