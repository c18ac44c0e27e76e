"""FirstByteTimer: one observation per POST under /v1/ answered 2xx, at its first non-empty body piece."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Histogram
from starlette.testclient import TestClient

from pdlaunch.http.first_byte import FirstByteTimer
from pdlaunch.metrics.buckets import FIRST_BYTE_BUCKETS

DELAY = 0.05


def _app(histogram: Histogram, labelled: bool) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/stream")
    async def stream() -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            yield b""  # an empty piece is no first byte
            await asyncio.sleep(DELAY)
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"
        return StreamingResponse(events())

    @app.post("/v1/whole")
    async def whole() -> JSONResponse:
        return JSONResponse({"ok": True})

    @app.post("/v1/refused")
    async def refused() -> JSONResponse:
        return JSONResponse({"error": "no"}, status_code=400)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"data": []})

    @app.post("/internal/kv")
    async def internal() -> JSONResponse:
        return JSONResponse({})

    if labelled:
        app.add_middleware(FirstByteTimer, histogram=histogram, label=lambda path: f"route {path}")
    else:
        app.add_middleware(FirstByteTimer, histogram=histogram)
    return app


def _count_and_sum(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> tuple[float, float]:
    count = registry.get_sample_value(f"{name}_count", labels)
    total = registry.get_sample_value(f"{name}_sum", labels)
    return (count or 0.0, total or 0.0)


def test_only_successful_api_posts_are_timed_once_each() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("ttfb_seconds", "test", buckets=FIRST_BYTE_BUCKETS, registry=registry)
    with TestClient(_app(histogram, labelled=False)) as client:
        assert client.post("/v1/stream").text == "data: 1\n\ndata: 2\n\n"
        count, total = _count_and_sum(registry, "ttfb_seconds")
        assert count == 1 and total >= DELAY  # one observation, taken at the first non-empty piece
        assert client.post("/v1/whole").status_code == 200
        assert _count_and_sum(registry, "ttfb_seconds")[0] == 2
        assert client.post("/v1/refused").status_code == 400
        assert client.get("/v1/models").status_code == 200
        assert client.post("/internal/kv").status_code == 200
        assert _count_and_sum(registry, "ttfb_seconds")[0] == 2  # none of those three


def test_a_labelled_histogram_is_observed_under_the_requests_label() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("ttfb_seconds", "test", ["route"], buckets=FIRST_BYTE_BUCKETS, registry=registry)
    with TestClient(_app(histogram, labelled=True)) as client:
        client.post("/v1/whole")
        client.post("/v1/whole")
        client.post("/v1/stream")
    assert _count_and_sum(registry, "ttfb_seconds", {"route": "route /v1/whole"})[0] == 2
    assert _count_and_sum(registry, "ttfb_seconds", {"route": "route /v1/stream"})[0] == 1
