"""`GET /v1/kv_events`: the instance's KV cache events as newline-delimited JSON (kvcache/events.py).

The stream opens with a `snapshot` (engine_id, block_size, every cached block's chained hash), then
one `stored` or `removed` line per batch of changes as the engine makes them (kvcache/event_log.py),
each with the next `seq`, and an empty line (heartbeat) after HEARTBEAT_S seconds without one. It
ends when the client goes away, when the client falls behind by more
than the log's bound (reconnect: a new snapshot follows), or when the engine stops; the client tells
those apart only by reconnecting. Access is that of /info (http/auth.py): the API key, or the
deployment's internal token that the proxy sends.

A caller without the internal token opens a stream only while fewer than MAX_SUBSCRIBERS are open (a 503
otherwise): the engine thread hands every change to every subscriber and the event loop wakes each of them, so
thousands of idle streams slowed every request of the instance many times over. The deployment's own (the
proxy's, one per proxy worker) always open.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from pdlaunch.http.auth import INTERNAL_TOKEN_HEADER, AccessPolicy
from pdlaunch.http.disconnect import ClientDisconnected, DisconnectWatch
from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.sse import ClosingStreamingResponse
from pdlaunch.kvcache import events
from pdlaunch.kvcache.event_log import KvEventLog, KvEventSubscription
from pdlaunch.kvcache.events import KvEvent, KvRemoved, KvSnapshot, KvStored, hash_hex
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.instance import Handler, instance_of

KV_EVENTS_PATH = "/v1/kv_events"
NDJSON = "application/x-ndjson"
HEADERS = {"Cache-Control": "no-cache"}
ENGINE_CHECK_S = 1.0  # how often an idle stream checks that the engine still runs
MAX_SUBSCRIBERS = 32  # the proxy's workers and a few routers of a few processes each


async def kv_events(request: Request) -> Response:
    instance = instance_of(request)
    engine_loop = instance.engine_loop
    if engine_loop.state != "ready":
        raise OpenAIError(503, f"engine is not ready (state: {engine_loop.state})", code="not_ready")
    engine = engine_loop.engine
    log: KvEventLog = engine.block_manager.events
    internal = AccessPolicy.from_secrets(None, instance.config.security.deployment_secret).is_internal(
        request.headers.get(INTERNAL_TOKEN_HEADER))
    if not internal and log.num_subscribers >= MAX_SUBSCRIBERS:
        raise OpenAIError(503, f"{log.num_subscribers} streams of this instance's KV events are open; a client opens "
                               f"one while fewer than {MAX_SUBSCRIBERS} are: close one and retry",
                          code="too_many_subscribers")
    if request.method == "HEAD":  # what a GET would answer, less the stream: one never ends, nor its connection
        return Response(media_type=NDJSON, headers=HEADERS)
    subscriber, cached = log.subscribe(asyncio.get_running_loop())
    snapshot = KvSnapshot(seq=0, engine_id=engine.engine_id, block_size=engine.block_size,
                          hashes=[hash_hex(h) for h in cached],
                          num_blocks=engine.block_manager.pools[engine.block_manager.event_group].num_blocks)

    async def unsubscribe() -> None:
        log.unsubscribe(subscriber)

    return ClosingStreamingResponse(_lines(request, engine_loop, log, subscriber, snapshot), on_close=unsubscribe,
                                    headers=HEADERS, media_type=NDJSON)


async def _lines(request: Request, engine_loop: EngineLoop, log: KvEventLog, subscriber: KvEventSubscription,
                 snapshot: KvSnapshot) -> AsyncIterator[bytes]:
    yield _line(snapshot)
    seq = 0
    loop = asyncio.get_running_loop()
    last_line = loop.time()
    with DisconnectWatch(request) as watch:
        while engine_loop.state == "ready":
            try:
                runs = await watch.run(log.next_runs(subscriber, min(ENGINE_CHECK_S, events.HEARTBEAT_S)))
            except ClientDisconnected:
                return
            if runs is None:  # fell behind (or the engine stopped): the client reconnects for a new snapshot
                return
            now = loop.time()
            if runs:
                last_line = now
            elif now - last_line >= events.HEARTBEAT_S:
                last_line = now
                yield b"\n"  # heartbeat: nothing changed, and the stream is alive
            for kind, hashes in runs:
                seq += 1
                wire = [hash_hex(h) for h in hashes]
                yield _line(KvStored(seq=seq, hashes=wire) if kind == "stored" else KvRemoved(seq=seq, hashes=wire))


def _line(event: KvEvent) -> bytes:
    return event.model_dump_json().encode() + b"\n"


ROUTES: list[tuple[str, str, Handler]] = [("GET", KV_EVENTS_PATH, kv_events)]
