"""A streamed decode leg that fails after its response headers (its decode died mid-stream, or streamed an error
event) and is not continued elsewhere (no other decode, migration off, or a field that keeps it from migrating):
the client's stream ends with the error event, and the KV the prefill holds for that leg goes back at once. The
decode streams its first token before it loads the KV (engine/first_token.py), so a decode that fails after it may
never have read it; without the release the blocks stayed held until kv_transfer.kv_lease_seconds. A stream that
ends whole releases nothing (its decode read the KV)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_hardening import SECRET, Prefill


class Decode:
    """A whole answer when not streamed; else streams one chunk, then as the prompt says: `whole` ends with
    [DONE], `dies` ends the stream there (no [DONE]), `error` sends an OpenAI error event and [DONE]."""

    def __init__(self) -> None:
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.post("/v1/completions")(self.completions)

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        if not body.get("stream"):
            return {"id": "cmpl-d", "object": "text_completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "text": "AB", "finish_reason": "length"}]}
        choice = {"index": 0, "text": "A", "finish_reason": None, "token_ids": [7], "prompt_token_ids": [1, 2]}
        chunk = {"id": "cmpl-d", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
        last = {**chunk, "choices": [{"index": 0, "text": "B", "finish_reason": "length", "token_ids": [8]}]}

        async def events() -> AsyncIterator[bytes]:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            if body["prompt"] == "whole":
                yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode()
            elif body["prompt"] == "error":
                error = {"error": {"message": "the engine failed", "type": "internal_server_error", "code": 500}}
                yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")


@contextmanager
def _deployment(migration_limit: int) -> Iterator[tuple[str, Prefill]]:
    ports, prefill = PortAllocator("127.0.0.1"), Prefill()
    with ThreadServer(prefill.app, ports.free("prefill")) as p, ThreadServer(Decode().app, ports.free("decode")) as d:
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d.url, "decode-0")])
        app = build_proxy_app(pool, 60.0, deployment_secret=SECRET, migration_limit=migration_limit)
        with ThreadServer(app, ports.free("proxy")) as proxy:
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see both instances")
            yield proxy.url, prefill


def _events(text: str) -> list[Any]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


# Migration on (one decode: nowhere to go), off, and a stream that cannot migrate (a stop string).
@pytest.mark.parametrize(("migration_limit", "fields"), [(3, {}), (0, {}), (3, {"stop": ["\n\n"]})],
                         ids=["no-other-decode", "migration-off", "not-migratable"])
@pytest.mark.parametrize("ending", ["dies", "error"])
def test_a_stream_whose_decode_fails_mid_stream_releases_the_prefills_held_kv(
        migration_limit: int, fields: dict[str, Any], ending: str) -> None:
    with _deployment(migration_limit) as (url, prefill):
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": ending, "max_tokens": 8, "stream": True,
                                                           **fields}, timeout=30)
        assert answer.status_code == 200, answer.text
        events = _events(answer.text)
        assert events[0]["choices"][0]["text"] == "A" and "error" in events[-1], answer.text
        assert answer.text.endswith("data: [DONE]\n\n"), answer.text[-200:]
        held = prefill.legs[-1]
        wait_for(lambda: held in prefill.released, f"the proxy to release {held}", timeout=10)
        assert prefill.released.count(held) == 1


def test_a_stream_that_ends_whole_releases_nothing() -> None:
    with _deployment(3) as (url, prefill):
        for fields in ({}, {"stop": ["\n\n"]}):
            answer = httpx.post(f"{url}/v1/completions", json={"prompt": "whole", "max_tokens": 8, "stream": True,
                                                               **fields}, timeout=30)
            assert [e["choices"][0]["text"] for e in _events(answer.text)] == ["A", "B"], answer.text
        whole = list(prefill.legs)
        # The proxy closes a stream after its last event reached the client: a failed stream after them, whose
        # release is awaited, comes after those closes (and any release they would have sent).
        httpx.post(f"{url}/v1/completions", json={"prompt": "dies", "max_tokens": 8, "stream": True}, timeout=30)
        failed = prefill.legs[-1]
        wait_for(lambda: failed in prefill.released, f"the proxy to release {failed}", timeout=10)
        assert not set(whole) & set(prefill.released), (whole, prefill.released)
