"""What the proxy reads whole from an instance is bounded in time for the whole answer (httpx's timeouts bound
each read, so an answer that trickles in never timed out) and in size: the health probe, the /metrics
federation, a leg's whole answer and a leg's error answer. Over real HTTP from scripted instances."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy import routes, upstream
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import HEALTH_MAX_BYTES, Instance, InstancePool
from tests.serving.helpers import ThreadServer, wait_for

METRICS = "# TYPE pdlaunch_test_total counter\npdlaunch_test_total 3.0\n"


class Scripted:
    """/health and /metrics answered as `health` / `metrics` say: "ok", "trickle" (a byte every 0.2 s until the
    test ends: never a whole answer, never a read timeout) or "huge" (a valid answer past the proxy's bound)."""

    def __init__(self, health: str = "ok", metrics: str = "ok") -> None:
        self.health, self.metrics = health, metrics
        self.stop = threading.Event()
        self.app = FastAPI()
        self.app.get("/health")(self.health_answer)
        self.app.get("/metrics")(self.metrics_answer)

    async def _trickle(self, start: bytes) -> AsyncIterator[bytes]:
        yield start
        while not self.stop.is_set():
            await asyncio.sleep(0.2)
            yield b" "

    async def health_answer(self) -> Any:
        if self.health == "trickle":
            return StreamingResponse(self._trickle(b'{"status": "ok"'), media_type="application/json")
        pad = "x" * (2 * HEALTH_MAX_BYTES) if self.health == "huge" else ""
        return Response(f'{{"status": "ok", "pad": "{pad}"}}', media_type="application/json")

    async def metrics_answer(self) -> Any:
        if self.metrics == "trickle":
            return StreamingResponse(self._trickle(METRICS.encode()), media_type="text/plain")
        return PlainTextResponse(METRICS)


@pytest.fixture
def ports() -> PortAllocator:
    return PortAllocator("127.0.0.1")


def _probed(url: str, timeout_s: float = 1.0) -> Instance:
    """The instance at `url` after one health probe (which must end: 20 s is far past its timeout)."""
    instance = Instance("decode", url, "decode-0")
    pool = InstancePool([instance], health_timeout_s=timeout_s)

    async def probe() -> None:
        async with httpx.AsyncClient() as client:
            await asyncio.wait_for(pool.check_all(client), 20)

    asyncio.run(probe())
    return instance


@pytest.mark.parametrize(("health", "state"), [("ok", "ready"), ("trickle", "stalled"), ("huge", "starting")])
def test_a_health_answer_is_whole_in_time_and_small(ports: PortAllocator, health: str, state: str) -> None:
    fake = Scripted(health=health)
    with ThreadServer(fake.app, ports.free("fake")) as server:
        try:
            instance = _probed(server.url)
        finally:
            fake.stop.set()
    assert instance.state == state, instance
    if health == "trickle":
        assert "/health did not answer within 1s" in instance.detail
    if health == "huge":  # not ready: unhealthy once it had been, and saying why
        assert f"more than {HEALTH_MAX_BYTES} bytes" in instance.detail


@pytest.fixture
def fleet(ports: PortAllocator) -> Iterator[str]:
    """A proxy in front of a colocated instance whose /metrics trickles and one that answers."""
    slow, fine = Scripted(metrics="trickle"), Scripted()
    with ThreadServer(slow.app, ports.free("slow")) as s, ThreadServer(fine.app, ports.free("fine")) as f:
        pool = InstancePool([Instance("colocated", s.url, "colocated-0"), Instance("colocated", f.url, "colocated-1")])
        try:
            with ThreadServer(build_proxy_app(pool, 60.0), ports.free("proxy")) as proxy:
                wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200 and
                         all(i.state == "ready" for i in pool.instances), "the proxy to see both")
                yield proxy.url
        finally:
            slow.stop.set()


def test_an_instance_whose_metrics_trickle_is_left_out_of_the_scrape(fleet: str) -> None:
    answer = httpx.get(f"{fleet}/metrics", timeout=20)  # the scrape's own 2 s for the whole answer, then it ends
    assert answer.status_code == 200
    lines = answer.text.splitlines()
    assert [line for line in lines if line.startswith("pdlaunch_test_total{")] == [
        'pdlaunch_test_total{instance="colocated-1",role="colocated"} 3.0']
    assert "pdlaunch_proxy_federation_errors_total 1.0" in lines


class Refusing:
    """/v1/completions: a streamed request is refused (400) with an error body that trickles in (never whole) or
    with one of 2 MiB; a whole one answered 200 with 2 MiB."""

    def __init__(self) -> None:
        self.error = "trickle"
        self.stop = threading.Event()
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.post("/v1/completions")(self.completions)

    async def completions(self, request: Request) -> Any:
        big = json.dumps({"error": {"message": "x" * (2 << 20)}})
        if not (await request.json()).get("stream"):
            return Response(json.dumps({"choices": [], "pad": "x" * (2 << 20)}), media_type="application/json")
        if self.error == "huge":
            return Response(big, status_code=400, media_type="application/json")

        async def trickle() -> AsyncIterator[bytes]:
            yield b'{"error": {"message": "'
            while not self.stop.is_set():
                await asyncio.sleep(0.2)
                yield b"x"

        return StreamingResponse(trickle(), status_code=400, media_type="application/json")


@pytest.fixture
def refused(ports: PortAllocator) -> Iterator[tuple[str, Refusing, Instance]]:
    fake = Refusing()
    with ThreadServer(fake.app, ports.free("fake")) as server:
        instance = Instance("colocated", server.url, "colocated-0")
        try:
            with ThreadServer(build_proxy_app(InstancePool([instance]), 3.0), ports.free("proxy")) as proxy:
                wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see it")
                yield proxy.url, fake, instance
        finally:
            fake.stop.set()


def _post(url: str, stream: bool) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "stream": stream}, timeout=20)


def test_an_error_answer_that_trickles_ends_at_the_request_s_deadline(refused: tuple[str, Refusing, Instance]) -> None:
    url, _, instance = refused
    answer = _post(url, stream=True)  # the proxy's request_timeout 3 s, not never
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["message"] == "HTTP 400"
    wait_for(lambda: instance.in_flight == 0, "the refused leg's in-flight count to end", 10)


def test_answers_past_their_bound_are_not_read_whole(refused: tuple[str, Refusing, Instance],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    url, fake, instance = refused
    fake.error = "huge"
    refusal = _post(url, stream=True)
    assert refusal.status_code == 400, refusal.text
    limit = upstream.ERROR_MAX_BYTES
    assert refusal.json()["error"]["message"] == f"HTTP 400 with an answer of more than {limit} bytes"
    monkeypatch.setattr(upstream, "MAX_ANSWER_BYTES", 1 << 20)  # 1 GiB (as one stream event) in the proxy
    whole = _post(url, stream=False)
    assert whole.status_code == 502, whole.text
    assert whole.json()["error"]["message"] == \
        f"colocated-0 ({instance.url}) sent an answer of more than {1 << 20} bytes"


class Relayed:
    """/v1/models trickles (never whole), /tokenize answers past the relay's bound, /is_sleeping trickles."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.get("/v1/models")(self.trickle)
        self.app.get("/is_sleeping")(self.trickle)
        self.app.post("/tokenize")(self.huge)

    async def trickle(self) -> Any:
        async def body() -> AsyncIterator[bytes]:
            yield b'{"data": ['
            while not self.stop.is_set():
                await asyncio.sleep(0.2)
                yield b" "

        return StreamingResponse(body(), media_type="application/json")

    async def huge(self) -> Any:
        return Response(json.dumps({"tokens": [1] * (1 << 20)}), media_type="application/json")


def test_relayed_and_control_answers_are_bounded(ports: PortAllocator, monkeypatch: pytest.MonkeyPatch) -> None:
    """/v1/models, /tokenize and the control fan-out read an instance's answer with httpx's per-read timeout and
    no size bound: one that trickled held the client's call forever, one without end was read whole. Now the
    whole answer has proxy.request_timeout_seconds and a size bound."""
    monkeypatch.setattr(routes, "RELAY_MAX_BYTES", 1 << 20)
    fake = Relayed()
    with ThreadServer(fake.app, ports.free("fake")) as server:
        instance = Instance("colocated", server.url, "colocated-0")
        try:
            app = build_proxy_app(InstancePool([instance]), 2.0, api_key="key")
            with ThreadServer(app, ports.free("proxy")) as proxy:
                wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see it")
                auth = {"Authorization": "Bearer key"}
                models = httpx.get(f"{proxy.url}/v1/models", headers=auth, timeout=20)
                assert models.status_code == 504, models.text
                tokens = httpx.post(f"{proxy.url}/tokenize", json={"prompt": "hi"}, headers=auth, timeout=20)
                assert tokens.status_code == 502, tokens.text
                assert tokens.json()["error"]["message"] == \
                    f"colocated-0 ({instance.url}) sent an answer of more than {1 << 20} bytes"
                sleeping = httpx.get(f"{proxy.url}/is_sleeping", headers=auth, timeout=20)
                assert sleeping.status_code == 502, sleeping.text  # the fan-out's status for an instance's 5xx
                assert sleeping.json()["instances"][0]["status"] == 504
                assert sleeping.json()["error"]["message"] == \
                    "colocated-0: no whole answer within proxy.request_timeout_seconds (2s)"
        finally:
            fake.stop.set()
