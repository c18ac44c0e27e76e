"""The proxy's fleet features on request shapes beyond the plain one, against fake instances over real HTTP:
a stream that is not continued mid-way (stop strings) still moves whole off a decode that stalls before its
headers; a stream that migrates stops counting as work queued on the decode it left (prefix routing)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.model.demo import resolve_model_path
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.prefix import queued
from tests.serving.helpers import ThreadServer, wait_for

STALL_S = 60.0  # a stalled fake answers nothing for this long (or until the test ends)


class StallingInstance:
    """Takes a request and never answers it; its /health stops answering from then on (SIGSTOP's picture)."""

    def __init__(self) -> None:
        self.stalled = threading.Event()
        self.released = threading.Event()  # the test's end: answer at last, so the server stops at once
        self.app = FastAPI()
        self.app.get("/health")(self.health)
        self.app.post("/v1/completions")(self.completions)

    async def health(self) -> Any:
        if self.stalled.is_set():
            await asyncio.to_thread(self.released.wait, STALL_S)
        return {"status": "ok"}

    async def completions(self, request: Request) -> Any:
        self.stalled.set()
        await asyncio.to_thread(self.released.wait, STALL_S)
        return {}


class StreamingInstance:
    """Streams one chunk of text, then its end; records each request's body."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.bodies: list[dict[str, Any]] = []
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.post("/v1/completions")(self.completions)

    async def completions(self, request: Request) -> Any:
        self.bodies.append(await request.json())
        chunk = {"id": "cmpl-s", "object": "text_completion", "created": 1, "model": "m",
                 "choices": [{"index": 0, "text": self.text, "finish_reason": "length", "logprobs": None}]}

        async def events() -> AsyncIterator[bytes]:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def test_a_stream_with_stop_strings_moves_whole_off_a_decode_stalled_before_its_headers() -> None:
    """Stop strings keep a stream from being continued mid-way, not from being sent again before any byte of it
    reached the client: it waited for the request's deadline on the stalled decode (300 s by default)."""
    ports, stalling, streaming = PortAllocator("127.0.0.1"), StallingInstance(), StreamingInstance("moved")
    with ThreadServer(stalling.app, ports.free("c0")) as c0, ThreadServer(streaming.app, ports.free("c1")) as c1:
        pool = InstancePool([Instance("colocated", c0.url, "colocated-0"),
                             Instance("colocated", c1.url, "colocated-1")], health_timeout_s=0.5)
        app = build_proxy_app(pool, 30.0, migration_limit=1)
        try:
            with ThreadServer(app, ports.free("proxy")) as proxy:
                wait_for(lambda: all(i.state == "ready" for i in pool.instances), "both instances ready")
                pool.policy.choose = lambda role, ready: ready[0]  # type: ignore[method-assign]  # colocated-0 first
                started = time.monotonic()
                answer = httpx.post(f"{proxy.url}/v1/completions", timeout=60, trust_env=False, json={
                    "prompt": "go", "max_tokens": 4, "stream": True, "stop": ["\n"]})
                took = time.monotonic() - started
                metrics = httpx.get(f"{proxy.url}/metrics", timeout=10, trust_env=False).text
        finally:
            stalling.released.set()  # before its server stops: that waits for the handlers' threads
    assert answer.status_code == 200, answer.text
    events = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["text"] == "moved", events
    assert took < 25, f"{took:.1f}s: it waited for the request's deadline"
    # sent whole, as the client sent it: no token ids it did not ask for
    assert streaming.bodies == [{"prompt": "go", "max_tokens": 4, "stream": True, "stop": ["\n"]}]
    assert 'pdlaunch_proxy_migrations_total{reason="stalled"} 1.0' in metrics


class DyingThenGatedInstance:
    """A first stream sends one token (with the prompt's ids) and ends without [DONE], as a decode that died;
    a continuation (a prompt of token ids) sends one token, then its end once `gate` opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.continued = threading.Event()
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.post("/v1/completions")(self.completions)

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        continuation = len(body["prompt"]) > len(PROMPT)

        def chunk(text: str, finish: str | None, **more: Any) -> bytes:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None, "token_ids": [7], **more}
            event = {"id": "cmpl-d", "object": "text_completion", "choices": [choice]}
            return f"data: {json.dumps(event)}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            if not continuation:
                yield chunk("A", None, prompt_token_ids=body["prompt"])
                return  # died
            self.continued.set()
            yield chunk("B", None)
            opened = await asyncio.to_thread(self.gate.wait, STALL_S)
            assert opened, "the test never let the continuation end"
            yield chunk("C", "length")
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


PROMPT = list(range(100, 120))  # 20 token ids


def test_a_migrated_stream_stops_counting_as_queued_on_the_decode_it_left() -> None:
    """Prefix routing weighs each instance by the uncached prompt tokens of the legs in flight there: a stream
    that moved to another decode counted on the one it left until it ended, so that decode, restarted, looked
    busy with work running elsewhere."""
    ports, fake = PortAllocator("127.0.0.1"), DyingThenGatedInstance()
    with ThreadServer(fake.app, ports.free("c0")) as c0, ThreadServer(fake.app, ports.free("c1")) as c1:
        pool = InstancePool([Instance("colocated", c0.url, "colocated-0"),
                             Instance("colocated", c1.url, "colocated-1")], "prefix")
        app = build_proxy_app(pool, 30.0, migration_limit=1, tokenizer_dir=resolve_model_path("tiny"))
        try:
            with ThreadServer(app, ports.free("proxy")) as proxy:
                wait_for(lambda: all(i.state == "ready" for i in pool.instances), "both instances ready")
                pool.policy.choose = lambda role, ready: ready[0]  # type: ignore[method-assign]  # colocated-0 first
                text: list[str] = []

                def read() -> None:
                    with httpx.stream("POST", f"{proxy.url}/v1/completions", timeout=60, trust_env=False,
                                      json={"prompt": PROMPT, "max_tokens": 3, "stream": True}) as response:
                        text.extend(line for line in response.iter_lines() if line.startswith("data: "))

                reader = threading.Thread(target=read)
                reader.start()
                assert fake.continued.wait(30), "the stream never moved"
                # (the proxy counts the move before it opens the continuation)
                assert queued(pool.instances[0]) == 0
                fake.gate.set()
                reader.join(30)
        finally:
            fake.gate.set()
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in text[:-1]) == "ABC" and text[-1] == "data: [DONE]"
    assert [queued(i) for i in pool.instances] == [0, 0]
