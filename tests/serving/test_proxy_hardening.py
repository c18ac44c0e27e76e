"""The proxy over real HTTP against scripted instances: client errors stay 4xx and cost no prefill
leg, /metrics stays bounded under a path scan, and a prefill's held KV is released when the decode
leg will not run (decode refused, failed, unreachable, or the client left)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pdlaunch.http.auth import INTERNAL_TOKEN_HEADER, internal_token
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.serving.helpers import ThreadServer, wait_for

SECRET = "proxy-hardening-secret-0123456789"
MAX_REQUEST_BYTES = 1 << 20


class Prefill:
    """Answers every prefill leg with KV held under a fresh remote_request_id; records releases."""

    def __init__(self) -> None:
        self.legs: list[str] = []
        self.released: list[str] = []
        self.released_clients: list[str] = []  # X-Request-Ids of prefill legs the proxy never read
        self.leg_ids: list[str] = []
        self.tokens: set[str | None] = set()
        self._ids = itertools.count()
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.post("/v1/completions")(self.completions)
        self.app.post("/internal/kv/release")(self.release)

    async def completions(self, request: Request) -> Any:
        self.tokens.add(request.headers.get(INTERNAL_TOKEN_HEADER))
        self.leg_ids.append(str(request.headers.get("x-request-id")))
        if (await request.json()).get("prompt") == "slow prefill":  # answers as (or after) the client leaves
            await asyncio.sleep(3)
        rid = f"held-{next(self._ids)}"
        self.legs.append(rid)
        return {"choices": [{"text": "x"}], "kv_transfer_params": {"do_remote_prefill": True, "remote_request_id": rid}}

    async def release(self, request: Request) -> Any:
        if request.headers.get(INTERNAL_TOKEN_HEADER) != internal_token(SECRET):
            return JSONResponse({"error": {"message": "no token"}}, status_code=403)
        body = await request.json()
        if "client_request_id" in body:
            self.released_clients.append(body["client_request_id"])
            return {"released": 1}
        self.released.append(body["request_id"])
        return {"released": True}


class Decode:
    """Behaves as the prompt says: ok, refuse (400), fail (500), wait (answers after 30 s)."""

    def __init__(self) -> None:
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.post("/v1/completions")(self.completions)
        self.waiting = threading.Event()

    async def completions(self, request: Request) -> Any:
        prompt = (await request.json())["prompt"]
        if prompt == "refuse":
            return JSONResponse({"error": {"message": "prompt + max_tokens exceeds max_model_len",
                                           "type": "invalid_request_error", "param": "prompt"}}, status_code=400)
        if prompt == "fail":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if prompt == "wait":
            self.waiting.set()
            await asyncio.sleep(30)
        return {"choices": [{"text": "done"}]}


@pytest.fixture(scope="module")
def deployment() -> Iterator[tuple[str, Prefill, InstancePool]]:
    ports = PortAllocator("127.0.0.1")
    prefill, decode = Prefill(), Decode()
    with ThreadServer(prefill.app, ports.free("prefill")) as p, ThreadServer(decode.app, ports.free("decode")) as d:
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d.url, "decode-0")])
        app = build_proxy_app(pool, 60.0, deployment_secret=SECRET, max_request_bytes=MAX_REQUEST_BYTES)
        with ThreadServer(app, ports.free("proxy")) as proxy:
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see both")
            yield proxy.url, prefill, pool


@pytest.mark.parametrize(("raw", "param"), [
    ('{"prompt": "ok", "temperature": NaN}', "temperature"),
    ('{"prompt": "ok", "temperature": Infinity}', "temperature"),
    ('{"prompt": "ok", "seed": 18446744073709551616}', "seed"),
    ('{"prompt": "ok", "max_tokens": -3}', "max_tokens"),
    ('{"prompt": "a\\ud800b"}', "prompt"),
    ('{"prompt": "ok", "stop": "\\ud800"}', "stop"),
    ('{"prompt": "ok", "x": ' + "[" * 1000 + "]" * 1000 + "}", "body"),
    ('{"prompt": ', "body"),
])
def test_client_errors_are_400_before_any_leg(deployment: Any, raw: str, param: str) -> None:
    url, prefill, _ = deployment
    legs = len(prefill.legs)
    answer = httpx.post(f"{url}/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert len(prefill.legs) == legs


def test_overlong_request_id_is_400(deployment: Any) -> None:
    url, prefill, _ = deployment
    answer = httpx.post(f"{url}/v1/completions", json={"prompt": "ok"}, headers={"X-Request-Id": "r" * 257})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "X-Request-Id"


def test_body_over_the_limit_is_413(deployment: Any) -> None:
    url, prefill, _ = deployment
    legs = len(prefill.legs)
    answer = httpx.post(f"{url}/v1/completions", json={"prompt": "x" * MAX_REQUEST_BYTES})
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
    assert len(prefill.legs) == legs


def test_unknown_paths_share_one_metrics_label(deployment: Any) -> None:
    url, _, _ = deployment
    httpx.get(f"{url}/no-such-path-warmup")
    before = len(httpx.get(f"{url}/metrics").content)
    with httpx.Client() as client:
        for i in range(500):
            assert client.get(f"{url}/scan/{i}/x{i}").status_code == 404
    metrics = httpx.get(f"{url}/metrics").text
    assert len(metrics) - before < 200, f"/metrics grew by {len(metrics) - before} bytes"
    assert 'route="other",status="404"' in metrics and "/scan/" not in metrics


def test_legs_carry_the_internal_token(deployment: Any) -> None:
    url, prefill, _ = deployment
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "ok"}, timeout=30).status_code == 200
    assert prefill.tokens == {internal_token(SECRET)}


@pytest.mark.parametrize(("prompt", "status"), [("refuse", 400), ("fail", 502)])
def test_decode_refusal_or_failure_releases_the_prefill_kv(deployment: Any, prompt: str, status: int) -> None:
    url, prefill, _ = deployment
    for stream in (False, True):
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "stream": stream}, timeout=30)
        assert answer.status_code == status
        held = prefill.legs[-1]
        wait_for(lambda: held in prefill.released, f"the proxy to release {held}", timeout=5)


def test_success_releases_nothing(deployment: Any) -> None:
    url, prefill, _ = deployment
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "ok"}, timeout=30).status_code == 200
    assert prefill.legs[-1] not in prefill.released


def test_client_gone_before_the_decode_answers_releases_the_prefill_kv(deployment: Any) -> None:
    url, prefill, _ = deployment
    for stream in (False, True):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": "wait", "stream": stream}, timeout=1.5)
        held = prefill.legs[-1]
        wait_for(lambda: held in prefill.released, f"the proxy to release {held} after the client left", timeout=5)


def test_client_gone_during_the_prefill_leg_releases_what_the_prefill_holds_for_the_legs_id(deployment: Any) -> None:
    # The prefill may have answered (and hold KV) just as the proxy dropped the leg: the params never reach the
    # proxy, and the prefill saw no disconnect. The proxy names the leg's X-Request-Id, always one of its own.
    url, prefill, _ = deployment
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": "slow prefill"}, timeout=1.0)
    made = prefill.leg_ids[-1]
    assert made.startswith("pd-")
    wait_for(lambda: made in prefill.released_clients, f"the proxy to release what the prefill holds for {made}",
             timeout=10)
    # A client's own X-Request-Id may be reused by another request of that client: the leg gets the client's
    # id with a suffix of the proxy's, unique, and that is what is released. Twice with one id: two leg ids.
    for _ in range(2):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": "slow prefill"}, headers={"X-Request-Id": "mine-1"},
                       timeout=1.0)
    first, second = prefill.leg_ids[-2:]
    assert first.startswith("mine-1-leg") and second.startswith("mine-1-leg") and first != second
    wait_for(lambda: {first, second} <= set(prefill.released_clients),
             f"the proxy to release what the prefill holds for {first} and {second}", timeout=10)
    assert "mine-1" not in prefill.released_clients
    # The longest id a client may send still makes a leg id the instances accept (at most 256 characters).
    longest = "x" * 256
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": "slow prefill"}, headers={"X-Request-Id": longest},
                   timeout=1.0)
    leg = prefill.leg_ids[-1]
    assert len(leg) == 256 and leg.startswith("x" * 200) and "-leg" in leg


def test_client_gone_during_a_retried_prefill_leg_releases_the_replacement_prefill(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The first prefill refuses the connection (killed), the leg goes to another (retry.py), and the client
    # leaves while that one computes: the release goes to the replacement, which is the one holding the KV.
    ports = PortAllocator("127.0.0.1")
    live, decode = Prefill(), Decode()

    async def every_instance_ready(_client: object, instance: Instance) -> None:  # no probe marks the dead one down
        if instance.state == "starting":
            instance.state = "ready"

    with ThreadServer(live.app, ports.free("prefill")) as p, ThreadServer(decode.app, ports.free("decode")) as d:
        dead = Instance("prefill", f"http://127.0.0.1:{ports.free('nothing listens')}", "prefill-dead")
        pool = InstancePool([dead, Instance("prefill", p.url, "prefill-live"), Instance("decode", d.url, "decode-0")])
        monkeypatch.setattr(pool, "_check", every_instance_ready)
        app = build_proxy_app(pool, 60.0, deployment_secret=SECRET, max_request_bytes=MAX_REQUEST_BYTES)
        with ThreadServer(app, ports.free("proxy")) as proxy:
            wait_for(lambda: all(i.state == "ready" for i in pool.instances), "the proxy to take every instance")
            with pytest.raises(httpx.ReadTimeout):  # round robin sends the first prefill leg to the dead one
                httpx.post(f"{proxy.url}/v1/completions", json={"prompt": "slow prefill"}, timeout=1.0)
            assert dead.state == "down" and len(live.leg_ids) == 1, (dead.state, live.leg_ids)
            leg = live.leg_ids[0]
            wait_for(lambda: leg in live.released_clients, f"the proxy to ask prefill-live to release {leg}",
                     timeout=10)


def test_unreachable_decode_releases_the_prefill_kv(deployment: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    url, prefill, pool = deployment
    decode = pool.instances[1]

    async def no_health_checks(*_: object) -> None:  # a probe of the dead URL would mark it down before the leg
        return None

    monkeypatch.setattr(pool, "_check", no_health_checks)
    real_url, decode.url = decode.url, f"http://127.0.0.1:{PortAllocator('127.0.0.1').free('nothing listens')}"
    try:
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "ok"}, timeout=30)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "instance_unreachable"
        held = prefill.legs[-1]
        wait_for(lambda: held in prefill.released, f"the proxy to release {held}", timeout=5)
    finally:
        decode.url = real_url
        monkeypatch.undo()
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, "the decode to be routed to again", 10)
