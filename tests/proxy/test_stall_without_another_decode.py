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
