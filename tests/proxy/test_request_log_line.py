"""The proxy's one DEBUG line per request (PDLAUNCH_LOG_LEVEL=debug) says how long the request took there, so an
operator tracing a slow request by its X-Request-Id sees where the time went: before, it named the instances and
`streaming`, and only the instances' own lines had a time."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from pdlaunch.http.sse import DONE, sse_event
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.serving.helpers import ThreadServer, wait_for

SLOW_PREFILL_S = 0.4


def _prefill() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        await request.json()
        await asyncio.sleep(SLOW_PREFILL_S)  # a slow prefill leg: the time the line must show
        return {"choices": [{"text": "x"}], "kv_transfer_params": {"do_remote_prefill": True}}

    return app


def _decode() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok"}

    async def stream() -> AsyncIterator[bytes]:
        yield sse_event({"choices": [{"index": 0, "text": "t"}]})
        yield DONE

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        if body.get("stream"):
            return StreamingResponse(stream(), media_type="text/event-stream")
        return {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": "t",
                                                                          "finish_reason": "length"}]}

    return app


@pytest.fixture(scope="module")
def proxy_url() -> Iterator[str]:
    ports = PortAllocator("127.0.0.1")
    with ThreadServer(_prefill(), ports.free("prefill")) as p, ThreadServer(_decode(), ports.free("decode")) as d:
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d.url, "decode-0")])
        with ThreadServer(build_proxy_app(pool, request_timeout_s=30.0), ports.free("proxy")) as proxy:
            wait_for(lambda: pool.ready(), "both scripted instances to be ready")
            yield proxy.url


def _line(caplog: pytest.LogCaptureFixture, request_id: str) -> str:
    lines = [r.getMessage() for r in caplog.records if r.name == "pdlaunch.proxy"
             and r.getMessage().startswith(f"request {request_id} ")]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    return lines[0]


@pytest.mark.parametrize(("stream", "outcome"), [(True, "streaming after"), (False, "ok in")])
def test_the_line_says_how_long_the_request_took(proxy_url: str, caplog: pytest.LogCaptureFixture, stream: bool,
                                                 outcome: str) -> None:
    caplog.set_level(logging.DEBUG, logger="pdlaunch.proxy")
    request_id = f"slow-{stream}"
    r = httpx.post(f"{proxy_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": stream},
                   headers={"X-Request-Id": request_id}, timeout=30)
    assert r.status_code == 200, r.text
    wait_for(lambda: any(rec.getMessage().startswith(f"request {request_id} ") for rec in caplog.records),
             "the proxy's line for the request")
    line = _line(caplog, request_id)
    found = re.fullmatch(rf"request {request_id} /v1/completions via prefill-0 -> decode-0: {outcome} (\d+\.\d{{3}})s",
                         line)
    assert found, line
    assert float(found.group(1)) >= SLOW_PREFILL_S
