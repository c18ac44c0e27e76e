"""The proxy's 503s that mean "try again soon" carry Retry-After over HTTP, which the openai client waits for before
its retry: its own with no ready instance (a restart under way), and an instance's passed on with the 503 it relays.
A 503 a wait does not end (an instance asleep until someone wakes it) carries none, nor does one whose instance
sent a Retry-After that is not a whole number of seconds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pdlaunch.http.errors import error_body
from pdlaunch.http.retry_later import UNREACHABLE_RETRY_AFTER_S
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import RESTART_BACKOFF_S, Instance, InstancePool
from pdlaunch.proxy.unready import NO_INSTANCE_LOAD_S
from tests.serving.helpers import ThreadServer, wait_for

Proxies = tuple[str, str, InstancePool]
# an instance never seen ready: the launcher's default backoff and a load (proxy/unready.py)
NO_INSTANCE_RETRY_AFTER_S = int(RESTART_BACKOFF_S + NO_INSTANCE_LOAD_S)

# prompt -> (the instance's 503 code, its Retry-After header or None)
REFUSALS: dict[str, tuple[str, str | None]] = {
    "overloaded": ("overloaded", "7"),
    "sleeping": ("sleeping", None),
    "dated": ("overloaded", "Wed, 21 Oct 2015 07:28:00 GMT"),
    "zero": ("overloaded", "0"),
}


def refusing_instance() -> FastAPI:
    """A colocated instance that is healthy and answers every completion with a 503 (REFUSALS, by prompt)."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        code, retry_after = REFUSALS[(await request.json())["prompt"]]
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return JSONResponse(error_body(503, f"refused: {code}", code=code), status_code=503, headers=headers)

    return app


@pytest.fixture(scope="module")
def proxies() -> Iterator[Proxies]:
    """(URL of a proxy over the refusing instance once it is ready, URL of one whose only instance never starts, the
    latter's pool)."""
    ports = PortAllocator("127.0.0.1")
    nowhere = f"http://127.0.0.1:{ports.free('nothing listens')}"
    with ThreadServer(refusing_instance(), ports.free("instance")) as inst:
        pool = InstancePool([Instance("colocated", inst.url, "colocated-0")])
        empty = InstancePool([Instance("colocated", nowhere, "colocated-0")])
        with ThreadServer(build_proxy_app(pool, request_timeout_s=30.0), ports.free("proxy")) as proxy, \
                ThreadServer(build_proxy_app(empty, request_timeout_s=30.0), ports.free("empty proxy")) as idle:
            wait_for(lambda: pool.instances[0].state == "ready", "the proxy's probe to find colocated-0 ready")
            yield proxy.url, idle.url, empty


@pytest.mark.parametrize("stream", [False, True])
def test_no_ready_instance_says_when_to_retry(proxies: Proxies, stream: bool) -> None:
    r = httpx.post(f"{proxies[1]}/v1/completions", json={"prompt": "hi", "stream": stream}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_instance", r.text
    assert r.headers.get("retry-after") == str(NO_INSTANCE_RETRY_AFTER_S)


def test_an_unreachable_instance_says_when_to_retry(proxies: Proxies) -> None:
    """Marked ready by hand where nothing listens: the request is refused (instance_unreachable), or the proxy's probe
    marked it down first (no_instance); either 503 says when to retry."""
    pool = proxies[2]
    pool.instances[0].state = "ready"
    try:
        r = httpx.post(f"{proxies[1]}/v1/completions", json={"prompt": "hi"}, timeout=30)
    finally:
        pool.instances[0].state = "starting"
    code = r.json()["error"]["code"]
    assert r.status_code == 503 and code in ("instance_unreachable", "no_instance"), r.text
    if code == "instance_unreachable":
        assert r.headers.get("retry-after") == str(UNREACHABLE_RETRY_AFTER_S)
    else:  # counted down from when the probe marked it down: less on a loaded machine where the probe came first
        assert 1 <= int(r.headers["retry-after"]) <= NO_INSTANCE_RETRY_AFTER_S, r.headers


@pytest.mark.parametrize("stream", [False, True])
def test_an_instances_retry_after_is_passed_on(proxies: Proxies, stream: bool) -> None:
    r = httpx.post(f"{proxies[0]}/v1/completions", json={"prompt": "overloaded", "stream": stream}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
    assert r.headers.get("retry-after") == "7"


@pytest.mark.parametrize("prompt", ["sleeping", "dated", "zero"])
def test_no_retry_after_where_the_instance_gave_no_valid_one(proxies: Proxies, prompt: str) -> None:
    r = httpx.post(f"{proxies[0]}/v1/completions", json={"prompt": prompt}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == REFUSALS[prompt][0], r.text
    assert "retry-after" not in r.headers
