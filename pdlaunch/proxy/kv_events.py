"""What every instance caches, as the proxy follows its KV cache events (kvcache/events.py is the contract).

One task per instance reads its `GET /v1/kv_events` (the internal token, as every call to an instance):
newline-delimited JSON, first a `snapshot` (engine_id, block_size, the cached blocks' hashes; a large cache's
rest follows as `stored` events: server/kv_events.py), then `stored` / `removed` events whose `seq` goes up by
one. The task keeps that instance's set of cached block hashes (CachedBlocks). The set is known only between a
snapshot and the end of its stream:

- every line is validated with KV_EVENT; a line that is not a valid event, an event before the
  snapshot, or a seq gap (an event lost) forgets the set and re-opens the stream, whose first line is
  a new snapshot. A bad line is logged, never raised: the proxy serves on without that instance's set.
- a stream that ends or fails (the instance died or restarted; an instance without the route answers
  404) forgets the set and is re-opened after RETRY_MIN_S, doubling up to RETRY_MAX_S while it keeps
  failing (back to RETRY_MIN_S once a snapshot arrives).

- a line longer than MAX_LINE_BYTES (a broken or hostile instance, or whatever answers on its port, that never
  ends its line) is a bad line too: the proxy holds at most that much of one stream, never all it is sent.
- a set that grows past the snapshot's num_blocks, or past MAX_CACHED_HASHES whatever the stream says (an older
  instance names no num_blocks), is a broken stream too: the proxy holds a bounded set of each instance.
- a stream silent for READ_TIMEOUT_S (several heartbeats: an idle instance sends an empty line every
  HEARTBEAT_S) is dead though its connection is not closed (a half-open connection after a network
  fault, a stopped process): forgotten and re-opened like one that ended.

A dead instance closes the connection (re-opened as above); a stalled one gets no requests anyway
(instances.py), and a set whose engine_id is not the one the instance's /health names (it restarted
and the new stream has not caught up) is not used (CachedBlocks.usable).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from pydantic import ValidationError

from pdlaunch.kvcache.events import HEARTBEAT_S, KV_EVENT, KvEvent, KvSnapshot, KvStored
from pdlaunch.proxy.instances import Instance

log = logging.getLogger("pdlaunch.proxy")

EVENTS_PATH = "/v1/kv_events"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 3 * HEARTBEAT_S  # no line, not even a heartbeat, for this long: the stream is dead
RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0
# The longest line is an older instance's snapshot (every cached hash on one line): 35 bytes per cached block
# ("<32 hex digits>",). 256 MiB names 7.6M blocks, more than one instance's pool holds (an H200's 141 GB in
# 8-token fp8 blocks of a 0.5B model is under 3M).
MAX_LINE_BYTES = 256 << 20
# The most hashes a set may hold whatever the stream says its cache has: as many as the longest snapshot line names.
# An instance's own bound (the snapshot's num_blocks) is absent from older ones, and a broken or hostile one names
# any; without this, `stored` events (each line within MAX_LINE_BYTES) would grow the set without end.
MAX_CACHED_HASHES = MAX_LINE_BYTES // 35


class LineTooLong(ValueError):
    """A line passed MAX_LINE_BYTES before its end."""


async def ndjson_lines(chunks: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    """The lines of a byte stream, without their LF (a last line without one too); LineTooLong as soon as one
    passes `max_bytes`, before the rest of it is read. Each byte is searched once."""
    pending = bytearray()
    async for chunk in chunks:
        searched = len(pending)
        pending += chunk
        start, end = 0, pending.find(b"\n", searched)
        while end >= 0:
            if end - start > max_bytes:
                raise LineTooLong(f"a line of {end - start} bytes (the limit is {max_bytes})")
            yield bytes(pending[start:end])
            start, end = end + 1, pending.find(b"\n", end + 1)
        del pending[:start]
        if len(pending) > max_bytes:
            raise LineTooLong(f"a line past {max_bytes} bytes without its end")
    if pending:
        yield bytes(pending)


@dataclass
class CachedBlocks:
    """The block hashes one instance caches, as its current event stream says."""

    hashes: set[str] = field(default_factory=set)
    block_size: int = 0  # 0: no snapshot on the current stream: nothing is known
    engine_id: str = ""
    seq: int = -1
    num_blocks: int | None = None  # the snapshot's: more hashes than this is a broken stream (memory stays bounded)

    def usable(self, instance: Instance) -> bool:
        """Known, and of the engine the instance's /health names (when it names one)."""
        return self.block_size > 0 and (not instance.engine_id or instance.engine_id == self.engine_id)

    def forget(self) -> None:
        self.hashes, self.block_size, self.engine_id, self.seq, self.num_blocks = set(), 0, "", -1, None

    def apply(self, event: KvEvent) -> str | None:
        """Apply one event; None, or why the stream must be re-opened (the set is forgotten then)."""
        if isinstance(event, KvSnapshot):
            self.hashes, self.block_size, self.engine_id, self.seq, self.num_blocks = \
                set(event.hashes), event.block_size, event.engine_id, event.seq, event.num_blocks
            return self._past_the_cache()
        if self.block_size == 0:
            return f"a {event.type} event (seq {event.seq}) before the stream's snapshot"
        if event.seq != self.seq + 1:
            return f"seq {event.seq} after {self.seq}: events were lost"
        self.seq = event.seq
        if isinstance(event, KvStored):
            self.hashes.update(event.hashes)
            return self._past_the_cache()
        self.hashes.difference_update(event.hashes)
        return None

    def _past_the_cache(self) -> str | None:
        if self.num_blocks is not None and len(self.hashes) > self.num_blocks:
            return f"{len(self.hashes)} cached blocks, more than the {self.num_blocks} its cache has"
        if len(self.hashes) > MAX_CACHED_HASHES:
            return f"{len(self.hashes)} cached blocks, more than the {MAX_CACHED_HASHES} the proxy keeps of an instance"
        return None


class KvEventFeed:
    """One subscriber task per instance (start/stop with the app) and each instance's CachedBlocks."""

    def __init__(self, instances: list[Instance], headers: dict[str, str]) -> None:
        self.cached: dict[str, CachedBlocks] = {i.name: CachedBlocks() for i in instances}
        self._instances = instances
        self._headers = headers
        self._tasks: list[asyncio.Task[None]] = []

    def usable(self, instance: Instance) -> CachedBlocks | None:
        cached = self.cached.get(instance.name)
        return cached if cached is not None and cached.usable(instance) else None

    def start(self, client: httpx.AsyncClient) -> None:
        self._tasks = [asyncio.create_task(self._follow(client, i)) for i in self._instances]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _follow(self, client: httpx.AsyncClient, instance: Instance) -> None:
        delay, last_why = RETRY_MIN_S, ""
        while True:
            try:
                why, snapshot = await self._read(client, instance)
            except Exception as exc:  # noqa: BLE001 - the feed must outlive one bad stream
                log.exception("reading the KV events of %s failed", instance.name)
                why, snapshot = f"{type(exc).__name__}", False
            self.cached[instance.name].forget()
            if snapshot:
                delay = RETRY_MIN_S
            if why != last_why:  # one line per kind of failure, not one per retry
                log.info("KV events of %s: %s; re-opened in %.1fs (its cached blocks are unknown until then)",
                         instance.name, why, delay)
                last_why = why
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _read(self, client: httpx.AsyncClient, instance: Instance) -> tuple[str, bool]:
        """Follow one stream until it ends or must be re-opened: (why, whether a snapshot arrived)."""
        cached, snapshot = self.cached[instance.name], False
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S)
        try:
            async with client.stream("GET", instance.url + EVENTS_PATH, headers=self._headers,
                                     timeout=timeout) as response:
                if response.status_code != 200:
                    return f"{EVENTS_PATH} answered HTTP {response.status_code}", False
                # Raw bytes: an instance never compresses them, and a compressed answer is not decompressed
                # (a small one may expand past any bound): it fails validation as a bad line.
                async for line in ndjson_lines(response.aiter_raw(), MAX_LINE_BYTES):
                    if not line.strip():
                        continue
                    try:
                        event = KV_EVENT.validate_json(line)
                    except ValidationError as exc:
                        log.warning("%s sent a KV event that is not valid (%s): %.200s", instance.name,
                                    exc.errors()[0]["msg"] if exc.errors() else exc,
                                    line[:200].decode(errors="replace"))
                        return "a line that is not a valid event", snapshot
                    why = cached.apply(event)
                    if why is not None:
                        log.warning("KV events of %s: %s", instance.name, why)
                        return why, snapshot
                    snapshot = snapshot or isinstance(event, KvSnapshot)
            return "the stream ended", snapshot
        except LineTooLong as exc:
            log.warning("%s sent a KV event line that is too long: %s", instance.name, exc)
            return f"a line longer than {MAX_LINE_BYTES} bytes", snapshot
        except httpx.ReadTimeout:
            return f"no line, not even a heartbeat, for {READ_TIMEOUT_S:.0f}s", snapshot
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}", snapshot
