"""`GET /v1/kv_events`: the instance's KV cache events as newline-delimited JSON (kvcache/events.py).

The stream opens with a `snapshot` (engine_id, block_size, num_blocks and the chained hashes of the cached
blocks, at most SNAPSHOT_HASHES_PER_LINE of them; the rest follow as `stored` lines of that many, seq 1, 2, ...),
then one `stored` or `removed` line per batch of changes as the engine makes them (kvcache/event_log.py),
each with the next `seq`, and an empty line (heartbeat) after HEARTBEAT_S seconds without one. The cache as of
the subscription goes out in lines of bounded size, the event loop served between them: one line of every hash
held the instance's event loop (every stream it serves) for seconds on a cache of a million blocks, to convert and
write it, and the proxy's (every stream it relays) as long again to parse it. It
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
from collections.abc import AsyncIterator, Iterator

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
# Cached hashes per line of the opening snapshot (module doc): ~140 KiB of JSON, a few ms to write or parse.
SNAPSHOT_HASHES_PER_LINE = 4096


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
    num_blocks = engine.block_manager.pools[engine.block_manager.event_group].num_blocks
    opening = snapshot_lines(engine.engine_id, engine.block_size, num_blocks, cached)

    async def unsubscribe() -> None:
        log.unsubscribe(subscriber)

    return ClosingStreamingResponse(_lines(request, engine_loop, log, subscriber, opening), on_close=unsubscribe,
                                    headers=HEADERS, media_type=NDJSON)


def snapshot_lines(engine_id: str, block_size: int, num_blocks: int, cached: list[int]) -> Iterator[KvEvent]:
    """The cache as of the subscription (`cached`, chained hashes): a snapshot with its first
    SNAPSHOT_HASHES_PER_LINE hashes, then `stored` events of as many, seq 1, 2, ... (module doc)."""
    per_line = SNAPSHOT_HASHES_PER_LINE
    yield KvSnapshot(seq=0, engine_id=engine_id, block_size=block_size, num_blocks=num_blocks,
                     hashes=[hash_hex(h) for h in cached[:per_line]])
    for seq, start in enumerate(range(per_line, len(cached), per_line), start=1):
        yield KvStored(seq=seq, hashes=[hash_hex(h) for h in cached[start:start + per_line]])


async def _lines(request: Request, engine_loop: EngineLoop, log: KvEventLog, subscriber: KvEventSubscription,
                 opening: Iterator[KvEvent]) -> AsyncIterator[bytes]:
    seq = 0
    for event in opening:
        if event.seq:  # let the event loop serve the instance's requests between two lines of a large cache
            await asyncio.sleep(0)
        seq = event.seq
        yield _line(event)
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
