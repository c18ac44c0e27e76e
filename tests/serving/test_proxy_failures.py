"""The proxy over real HTTP against scripted instances that fail the ways real ones do:
unreachable, crashing mid-stream, hanging, and a client that goes away. Never a hang at the proxy.

The scripted instance speaks the instance API (health, kv_transfer_params, SSE) and misbehaves on
cue (the prompt says how); the engine-backed paths are covered by test_server.py and the e2e tests.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pdlaunch.http.sse import DONE, parse_sse, sse_event
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.serving.helpers import ThreadServer, wait_for


class ScriptedInstance:
    def __init__(self, role: str) -> None:
        self.role = role
        self.cancelled = threading.Event()
        self.healthy = True
        self.requests: list[dict[str, Any]] = []
        self.app = FastAPI()
        self.app.get("/health")(self.health)
        self.app.post("/v1/completions")(self.completions)

    async def health(self) -> Any:
        return JSONResponse({"status": "ok"} if self.healthy else {"status": "loading"},
                            status_code=200 if self.healthy else 503)

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        self.requests.append(body)
        if self.role == "prefill":
            return {"choices": [{"text": "x"}], "kv_transfer_params": {"do_remote_prefill": True}}
        if body["prompt"] == "hang" and not body.get("stream"):
            await asyncio.sleep(3600)
        return StreamingResponse(self._stream(body["prompt"]), media_type="text/event-stream")

    async def _stream(self, prompt: str) -> AsyncIterator[bytes]:
        try:
            for i in range(3):
                yield sse_event({"choices": [{"index": 0, "text": f"t{i}"}]})
            if prompt == "drop":
                raise RuntimeError("instance crashed mid-stream")
            if prompt in ("hang", "slow"):
                await asyncio.sleep(3600)
            yield DONE
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[str, ScriptedInstance, InstancePool, ScriptedInstance]]:
    """(proxy URL, the decode, the pool, the live prefill): prefill-0 and decode-0 scripted, prefill-1 where
    nothing listens."""
    ports = PortAllocator("127.0.0.1")
    prefill, decode = ScriptedInstance("prefill"), ScriptedInstance("decode")
    unreachable = f"http://127.0.0.1:{ports.free('nothing listens')}"
    with ThreadServer(prefill.app, ports.free("prefill")) as p, ThreadServer(decode.app, ports.free("decode")) as d:
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d.url, "decode-0"),
                             Instance("prefill", unreachable, "prefill-1")], "round_robin")
        with ThreadServer(build_proxy_app(pool, request_timeout_s=2.0), ports.free("proxy")) as proxy:
            yield proxy.url, decode, pool, prefill


def _mark_ready(pool: InstancePool) -> None:
    for inst in pool.instances:
        inst.state = "ready"


def test_stream_passes_through_and_legs_share_the_request_id(setup: Any) -> None:
    url, decode, pool, _ = setup
    _mark_ready(pool)
    pool.instances[2].state = "down"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "stream": True, "max_tokens": 5},
                   headers={"X-Request-Id": "rid-1"}, timeout=10)
    events = parse_sse(r.content)
    assert r.status_code == 200 and r.headers["x-request-id"] == "rid-1"
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == ["t0", "t1", "t2"] and events[-1] == "[DONE]"
    assert decode.requests[-1]["kv_transfer_params"] == {"do_remote_prefill": True}
    assert decode.requests[-1]["max_tokens"] == 5


def test_unreachable_prefill_is_retried_on_a_live_one_and_marked_down(setup: Any) -> None:
    url, _, pool, _ = setup
    _mark_ready(pool)
    body = {"prompt": "ok", "stream": True}
    statuses = [httpx.post(f"{url}/v1/completions", json=body, timeout=10).status_code for _ in range(2)]
    assert statuses == [200, 200]  # round robin hits prefill-1 once: refused, so prefill-0 serves it
    assert pool.instances[2].state == "down"
    r = httpx.get(f"{url}/instances", timeout=5).json()
    assert {i["name"]: i["state"] for i in r}["prefill-1"] == "down"


def _recomputed(url: str) -> float:
    """The proxy's count of prompts the decode computed because no prefill could (prefill_leg.py)."""
    name = 'pdlaunch_proxy_legs_retried_total{reason="recompute",role="prefill"} '
    lines = [line for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines() if line.startswith(name)]
    return float(lines[0][len(name):]) if lines else 0.0


def test_unreachable_prefill_without_another_leaves_the_prompt_to_the_decode(setup: Any) -> None:
    """Only the unreachable prefill-1 is left: prefill-0 answers /health 503, so the proxy's probe keeps it out
    (a state set by hand on a healthy instance is undone by the next probe, a second later: on a loaded machine
    the request could come after it). Whether the request tries prefill-1 (refused) or the probe has marked it down
    first (none ready), the prefill leg can run nowhere, and under kv_transfer.load_failure_policy recompute (the
    default) the decode computes the prompt: the client's request, without kv_transfer_params (policy fail's 503:
    tests/proxy/test_prefill_gone_recompute.py)."""
    url, decode, pool, prefill = setup
    recomputed = _recomputed(url)
    _mark_ready(pool)
    prefill.healthy = False
    try:
        wait_for(lambda: pool.instances[0].state == "unhealthy", "the probe to mark prefill-0 unhealthy")
        pool.instances[2].state = "ready"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "stream": True}, timeout=10)
        assert r.status_code == 200, r.text
        assert "kv_transfer_params" not in decode.requests[-1] and decode.requests[-1]["prompt"] == "ok"
        # once the leg found it unreachable (or the probe did), it is down: the next request finds no prefill ready
        wait_for(lambda: pool.instances[2].state == "down", "prefill-1 to be marked down")
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "stream": True, "max_tokens": 3}, timeout=10)
        assert r.status_code == 200, r.text
        assert "kv_transfer_params" not in decode.requests[-1] and decode.requests[-1]["max_tokens"] == 3
        assert _recomputed(url) == recomputed + 2
    finally:
        prefill.healthy = True
    wait_for(lambda: pool.instances[0].state == "ready", "prefill-0 to be ready again")


def test_crash_mid_stream_ends_with_an_openai_error_event(setup: Any) -> None:
    """The error event, then [DONE], as every OpenAI stream ends (vLLM's after an error too): a client reading
    until [DONE] took the stream for a cut connection."""
    url, _, pool, _ = setup
    _mark_ready(pool)
    pool.instances[2].state = "down"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "drop", "stream": True}, timeout=10)
    events = parse_sse(r.content)
    assert [json.loads(e)["choices"][0]["text"] for e in events[:3]] == ["t0", "t1", "t2"]
    assert len(events) == 5 and events[-1] == "[DONE]", events
    error = json.loads(events[-2])["error"]
    assert error["code"] == "instance_failed" and "decode-0" in error["message"]


@pytest.mark.slow
def test_hanging_instance_hits_the_request_timeout(setup: Any) -> None:
    url, _, pool, _ = setup
    _mark_ready(pool)
    pool.instances[2].state = "down"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hang"}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hang", "stream": True}, timeout=30)
    events = parse_sse(r.content)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout", events


def test_client_disconnect_closes_the_upstream_stream(setup: Any) -> None:
    url, decode, pool, _ = setup
    _mark_ready(pool)
    pool.instances[2].state = "down"
    decode.cancelled.clear()
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "slow", "stream": True}, timeout=10) as r:
        first = next(r.iter_bytes())
        assert first.startswith(b"data: ")
    assert decode.cancelled.wait(10), "the decode instance's stream was not cancelled after the client left"
    wait_for(lambda: pool.instances[1].in_flight == 0, "the decode leg to be released")


def test_health_follows_the_instances(setup: Any) -> None:
    url, decode, pool, _ = setup
    _mark_ready(pool)
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    decode.healthy = False
    try:
        wait_for(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 503, "proxy /health to turn 503")
        r = httpx.get(f"{url}/health", timeout=5)
        assert "decode" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "ok"}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
    finally:
        decode.healthy = True
    wait_for(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, "proxy /health to recover")
