"""A decode marked stalled mid-stream (its /health past proxy.health_timeout_seconds) while no other decode is ready:
the stream has nowhere to move, so the proxy keeps reading it, and the client gets the whole stream once the decode
answers again, as a whole answer waits for its only decode (leg_failure.unless_stalled) and as a stream that cannot
migrate goes on. Before, a stream relayed with migration was cut there with an error event though its decode, alive
and slow, went on to finish it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.bodies import JsonObject
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.migrate import Migrations
from pdlaunch.proxy.upstream import Proxy
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_hardening import SECRET, Prefill

HEALTH_TIMEOUT_S = 0.5
STALL_SEEN_S = 30.0  # how long the decode waits for the proxy to mark it stalled


class PausingDecode:
    """Streams one chunk, then stops answering /health until the proxy marks it stalled (read from the proxy's
    pool), then answers again and streams the rest of the answer."""

    def __init__(self) -> None:
        self.pool: InstancePool | None = None
        self.paused = False
        self.stall_seen = False
        self.app = FastAPI()
        self.app.get("/health")(self.health)
        self.app.post("/v1/completions")(self.completions)

    async def health(self) -> Any:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S * 4
        while self.paused and time.monotonic() < deadline:  # past the probe's timeout, or until it answers again
            await asyncio.sleep(0.05)
        return {"status": "ok"}

    def _stalled(self) -> bool:
        return self.pool is not None and any(i.role == "decode" and i.state == "stalled" for i in self.pool.instances)

    async def completions(self, request: Request) -> Any:
        await request.json()
        head = {"id": "cmpl-p", "object": "text_completion", "created": 1, "model": "m"}
        first = {**head, "choices": [{"index": 0, "text": "A", "finish_reason": None, "token_ids": [7],
                                      "prompt_token_ids": [1, 2]}]}
        last = {**head, "choices": [{"index": 0, "text": "B", "finish_reason": "length", "token_ids": [8]}]}

        async def events() -> AsyncIterator[bytes]:
            yield f"data: {json.dumps(first)}\n\n".encode()
            self.paused = True
            deadline = time.monotonic() + STALL_SEEN_S
            while not self._stalled() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self.stall_seen = self._stalled()
            self.paused = False
            yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")


def test_a_stream_on_the_only_decode_goes_on_through_its_stall() -> None:
    ports, prefill, decode = PortAllocator("127.0.0.1"), Prefill(), PausingDecode()
    with ThreadServer(prefill.app, ports.free("prefill")) as p, ThreadServer(decode.app, ports.free("decode")) as d:
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d.url, "decode-0")],
                            health_timeout_s=HEALTH_TIMEOUT_S)
        decode.pool = pool
        app = build_proxy_app(pool, 60.0, deployment_secret=SECRET, migration_limit=3)
        with ThreadServer(app, ports.free("proxy")) as proxy:
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see both instances")
            answer = httpx.post(f"{proxy.url}/v1/completions",
                                json={"prompt": "go", "max_tokens": 2, "stream": True}, timeout=60)
    events = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
    assert [e.get("error") for e in events] == [None, None], answer.text
    assert [e["choices"][0]["text"] for e in events] == ["A", "B"]
    assert answer.text.endswith("data: [DONE]\n\n")
    assert decode.stall_seen, "the proxy never marked the decode stalled: the test proved nothing"


def _given_up_as_the_other_decode_goes_down(run: Callable[[Migrations, Instance, Callable[[], None]], Awaitable[Any]],
                                            answer: object) -> tuple[Any, list[tuple[str, JsonObject]], int, list[str]]:
    """decode-0 is marked stalled while decode-1 is ready, so its leg is given up (unless_stalled); as that leg ends,
    the health probe marks decode-1 down. (What `run` returned, the legs sent as (decode, body), on_migrate() calls,
    migrations counted.) decode-0's second leg answers `answer`."""
    async def scenario() -> tuple[Any, list[tuple[str, JsonObject]], int, list[str]]:
        first, second = Instance("decode", "http://127.0.0.1:9", "decode-0"), Instance("decode", "http://127.0.0.1:9",
                                                                                        "decode-1")
        pool = InstancePool([first, second])
        first.state = second.state = "ready"
        sent: list[tuple[str, JsonObject]] = []
        released, counted = [0], []

        async def leg(instance: Instance, path: str, body: JsonObject, headers: Any, deadline: float) -> Any:
            sent.append((instance.name, body))
            if len(sent) > 1:
                return answer
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                pool.mark_down(second, "health check failed: ConnectError")  # the monitor, during the unwinding
                await asyncio.sleep(0)
                raise
            raise AssertionError("the first leg was never given up")

        proxy = Proxy(pool, 30.0)
        proxy.open_stream = proxy.post_json = leg  # type: ignore[method-assign, assignment]
        migrations = Migrations(proxy, 3, on_migrate=counted.append)

        def stall() -> None:
            pool.mark_stalled(first, "/health did not answer")

        asyncio.get_running_loop().call_later(0.05, stall)

        def on_migrate() -> None:
            released[0] += 1

        outcome = await asyncio.wait_for(run(migrations, first, on_migrate), 10)
        return outcome, sent, released[0], counted

    return asyncio.run(scenario())


LEG: JsonObject = {"prompt": "x", "kv_transfer_params": {"remote_engine_id": "p0"}}
BODY: JsonObject = {"prompt": "x"}


def test_a_stream_given_up_for_a_decode_that_then_went_down_waits_for_its_stalled_decode() -> None:
    """Migrations.open_stream took Stalled as proof another decode was ready and asked the policy to choose among none
    (RoundRobin: ZeroDivisionError; LeastLoaded: ValueError): a 500 with a traceback. Now, as with no other decode at
    all, the request waits for the stalled decode: its leg goes again there, without the prefill's KV (it may have read
    it), the prefill's hold released, and no migration counted."""
    def run(migrations: Migrations, first: Instance, on_migrate: Callable[[], None]) -> Awaitable[Any]:
        return migrations.open_stream(first, "/v1/completions", LEG, BODY, {}, time.monotonic() + 30, "r", on_migrate)

    (opened, migrated), sent, released, counted = _given_up_as_the_other_decode_goes_down(run, "the stream")
    assert (opened, migrated) == ("the stream", 0)
    assert sent == [("decode-0", LEG), ("decode-0", BODY)]
    assert (released, counted) == (1, [])


def test_an_answer_given_up_for_a_decode_that_then_went_down_waits_for_its_stalled_decode() -> None:
    """As the stream's, for a request that is not streamed (Migrations.answer)."""
    def run(migrations: Migrations, first: Instance, on_migrate: Callable[[], None]) -> Awaitable[Any]:
        return migrations.answer(first, "/v1/completions", LEG, BODY, {}, time.monotonic() + 30, "r", on_migrate)

    (decode, answer), sent, released, counted = _given_up_as_the_other_decode_goes_down(run, {"id": "a"})
    assert (decode.name, answer) == ("decode-0", {"id": "a"})
    assert sent == [("decode-0", LEG), ("decode-0", BODY)]
    assert (released, counted) == (1, [])


def _chunk(text: str, ids: list[int], finish: str | None = None, prompt_ids: list[int] | None = None) -> bytes:
    choice: JsonObject = {"index": 0, "text": text, "finish_reason": finish, "token_ids": list(ids)}
    if prompt_ids is not None:
        choice["prompt_token_ids"] = list(prompt_ids)
    event = {"id": "cmpl-r", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
    return f"data: {json.dumps(event)}\n\n".encode()


class _Leg(httpx.AsyncByteStream):
    """A decode's streamed answer: `chunks`, then `end` (None: the stream ends; "hang": it sends nothing more until
    the proxy gives it up; an exception: raised, as a dropped connection). `on_close` runs as the proxy closes it."""

    def __init__(self, chunks: list[bytes], end: str | Exception | None,
                 on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.chunks, self.end, self.on_close = chunks, end, on_close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if isinstance(self.end, Exception):
            raise self.end
        if self.end == "hang":
            await asyncio.Event().wait()

    async def aclose(self) -> None:
        if self.on_close is not None:
            await self.on_close()


def _relayed(decodes: int, answer: Callable[[InstancePool, int, str, JsonObject], Awaitable[_Leg]],
             on_first_chunk: Callable[[InstancePool], None]) -> tuple[str, list[tuple[str, JsonObject]], int,
                                                                       list[str], list[int]]:
    """A stream relayed with migration (Migrations.relay, as decode_leg runs it) over `decodes` decodes (d0, d1, ...)
    that answer `answer(pool, leg number, decode host, leg body)`; `on_first_chunk(pool)` runs once the client has
    the stream's first event. (What the client got, the legs sent as (decode host, body), on_migrate() calls,
    migrations counted, each decode's in-flight count at the end.)"""
    body: JsonObject = {"prompt": "go", "max_tokens": 2, "stream": True}

    async def scenario() -> tuple[str, list[tuple[str, JsonObject]], int, list[str], list[int]]:
        pool = InstancePool([Instance("decode", f"http://d{i}", f"decode-{i}", state="ready") for i in range(decodes)])
        sent: list[tuple[str, JsonObject]] = []

        async def handler(request: httpx.Request) -> httpx.Response:
            leg = json.loads(request.content)
            sent.append((request.url.host, leg))
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  stream=await answer(pool, len(sent), request.url.host, leg))

        proxy = Proxy(pool, 30.0)
        proxy.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        released, counted = [0], []

        def on_migrate() -> None:
            released[0] += 1

        migrations = Migrations(proxy, 3, on_migrate=counted.append)
        deadline = time.monotonic() + 30
        upstream = await proxy.open_stream(pool.instances[0], "/v1/completions", {**body, "return_token_ids": True},
                                           {}, deadline)
        out = b""
        async with asyncio.timeout(10):
            async for event in migrations.relay(upstream, "/v1/completions", body, False, {}, deadline, "r",
                                                on_migrate):
                if not out:
                    on_first_chunk(pool)
                out += event
        await proxy.client.aclose()
        return out.decode(), sent, released[0], counted, [i.in_flight for i in pool.instances]

    return asyncio.run(scenario())


def _client_events(stream: str) -> list[JsonObject]:
    return [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]


def _marks_down(pool: InstancePool, name: str) -> Callable[[], Awaitable[None]]:
    async def close() -> None:  # the health probe, during the proxy's await of the stream's close
        pool.mark_down(next(i for i in pool.instances if i.name == name), "health check failed: ConnectError")
        await asyncio.sleep(0)

    return close


def test_a_relayed_stream_given_up_for_a_decode_that_then_went_down_goes_on_on_its_stalled_decode() -> None:
    """decode-0 streams "A", is marked stalled while decode-1 is ready, and decode-1 is marked down as the proxy closes
    decode-0's stream. The client's stream ended there with a 502 instance_failed error event, though decode-0 was
    alive; now, as a stall with no other decode ready, it goes on on decode-0: the continuation from the prompt's and
    the sent ids (as a migration's), without the prefill's KV, not counted as a migration, the text whole."""
    async def answer(pool: InstancePool, leg: int, host: str, body: JsonObject) -> _Leg:
        if leg == 1:
            return _Leg([_chunk("A", [7], prompt_ids=[1, 2])], "hang", on_close=_marks_down(pool, "decode-1"))
        return _Leg([_chunk("B", [8], "length", prompt_ids=[1, 2, 7]), b"data: [DONE]\n\n"], None)

    def stall(pool: InstancePool) -> None:
        pool.mark_stalled(pool.instances[0], "/health did not answer")

    stream, sent, released, counted, in_flight = _relayed(2, answer, stall)
    events = _client_events(stream)
    assert [e.get("error") for e in events] == [None, None], stream
    assert "".join(e["choices"][0]["text"] for e in events) == "AB"
    assert stream.endswith("data: [DONE]\n\n")
    assert [(host, leg.get("prompt"), leg.get("max_tokens")) for host, leg in sent] == [("d0", "go", 2),
                                                                                       ("d0", [1, 2, 7], 1)]
    assert (released, counted, in_flight) == (1, [], [0, 0])


def test_a_continuation_given_up_before_its_headers_for_a_decode_that_then_went_down_goes_on_on_its_stalled_decode(
        ) -> None:
    """decode-0 drops the stream after "A"; the continuation goes to decode-1 (a migration), which is marked stalled
    before its headers while decode-2 is ready; decode-2 is marked down as that leg is cancelled. The stream ended with
    a 502 error event; now the continuation goes again to decode-1, not counted as a second migration."""
    async def answer(pool: InstancePool, leg: int, host: str, body: JsonObject) -> _Leg:
        if leg == 1:
            return _Leg([_chunk("A", [7], prompt_ids=[1, 2])], httpx.ReadError("connection reset"))
        if leg == 2:
            asyncio.get_running_loop().call_later(0.05, pool.mark_stalled, pool.instances[1], "/health did not answer")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await _marks_down(pool, "decode-2")()
                raise
        return _Leg([_chunk("B", [8], "length", prompt_ids=[1, 2, 7]), b"data: [DONE]\n\n"], None)

    stream, sent, released, counted, in_flight = _relayed(3, answer, lambda pool: None)
    events = _client_events(stream)
    assert [e.get("error") for e in events] == [None, None], stream
    assert "".join(e["choices"][0]["text"] for e in events) == "AB"
    assert stream.endswith("data: [DONE]\n\n")
    assert [(host, leg.get("prompt"), leg.get("max_tokens")) for host, leg in sent] == [
        ("d0", "go", 2), ("d1", [1, 2, 7], 1), ("d1", [1, 2, 7], 1)]
    assert (released, counted, in_flight) == (2, ["died"], [0, 0, 0])
