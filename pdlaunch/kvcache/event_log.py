"""Which full blocks this instance's prefix cache holds, told to subscribers as it changes.

The block manager notes each block that enters the prefix cache (`stored`) or leaves it (`removed`,
when its block is reused or the cache is reset) on the engine thread, and `flush`es at the end of each
of its operations: the notes update the set of cached hashes and go to every subscriber as a few
`(kind, hashes)` runs, in order. A subscriber (`GET /v1/kv_events`, server/kv_events.py) lives on the
asyncio side: the engine thread appends to its bounded buffer under a lock and wakes it with
`loop.call_soon_threadsafe`, as the engine loop hands over request outputs, so it never waits for a
subscriber. One that falls behind by more than `max_queued_hashes` is dropped: its stream ends and
it reconnects for a fresh snapshot.

Blocks are named by their prefix node's chained hash (kvcache/prefix_cache.py, from the prompt's
first token), so the hashes equal what `events.prompt_block_hashes` computes from token ids.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Literal

EventKind = Literal["stored", "removed"]
Run = tuple[EventKind, list[int]]  # one kind of change, the chained hashes it concerns, in order

DEFAULT_MAX_QUEUED_HASHES = 1 << 16  # per subscriber; about 4 MiB of pending 128-bit hashes


class KvEventSubscription:
    """One subscriber's pending runs. Filled on the engine thread, read on its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_queued_hashes: int) -> None:
        self._loop = loop
        self._max = max_queued_hashes
        self._runs: list[Run] = []
        self._queued = 0
        self._wake = asyncio.Event()  # only touched on `loop`
        self.dropped = False  # fell behind (or the log closed): its stream must end

    def offer(self, runs: list[Run], count: int) -> bool:
        """Log lock held: queue `runs` (`count` hashes); False when the subscriber is dropped instead."""
        if self._queued + count > self._max:
            self.drop()
        else:
            self._runs.extend(runs)
            self._queued += count
            self._wake_up()
        return not self.dropped

    def drop(self) -> None:
        """Log lock held: forget what is queued; the reader gets None and ends its stream."""
        self._runs, self._queued, self.dropped = [], 0, True
        self._wake_up()

    def _wake_up(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # its event loop is closed: nobody reads it any more
            self.dropped = True

    async def next_runs(self, lock: threading.Lock, timeout: float) -> list[Run] | None:
        """The runs queued since the last call (waiting up to `timeout` seconds for one; [] when none
        came), or None once the subscriber was dropped."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            return []
        self._wake.clear()  # before taking: a run offered after this sets it again
        with lock:
            if self.dropped:
                return None
            runs, self._runs, self._queued = self._runs, [], 0
        return runs


class KvEventLog:
    """The cached block hashes of one engine and its subscribers (one per instance: TP rank 0's)."""

    def __init__(self, max_queued_hashes: int = DEFAULT_MAX_QUEUED_HASHES) -> None:
        self.max_queued_hashes = max_queued_hashes
        self._lock = threading.Lock()
        self._cached: dict[int, int] = {}  # chained hash -> cached blocks carrying it (2+ only on a collision)
        self._pending: list[Run] = []  # noted since the last flush (engine thread only)
        self._subscribers: list[KvEventSubscription] = []

    # -- engine thread ---------------------------------------------------------------------------
    def stored(self, block_hash: int) -> None:
        self._note("stored", block_hash)

    def removed(self, block_hash: int) -> None:
        self._note("removed", block_hash)

    def _note(self, kind: EventKind, block_hash: int) -> None:
        if self._pending and self._pending[-1][0] == kind:
            self._pending[-1][1].append(block_hash)
        else:
            self._pending.append((kind, [block_hash]))

    def flush(self) -> None:
        """Apply what was noted and hand it to every subscriber (never waits for one)."""
        if not self._pending:
            return
        runs, self._pending = self._pending, []
        count = sum(len(hashes) for _, hashes in runs)
        with self._lock:
            for kind, hashes in runs:
                for h in hashes:
                    if kind == "stored":
                        self._cached[h] = self._cached.get(h, 0) + 1
                    elif self._cached.get(h, 0) > 1:
                        self._cached[h] -= 1
                    else:
                        self._cached.pop(h, None)
            if self._subscribers:
                self._subscribers = [s for s in self._subscribers if s.offer(runs, count)]

    def close(self) -> None:
        """End every subscriber's stream (the engine shuts down)."""
        with self._lock:
            for subscriber in self._subscribers:
                subscriber.drop()
            self._subscribers = []

    # -- any thread ------------------------------------------------------------------------------
    def cached_counts(self) -> dict[int, int]:
        """Chained hash -> cached blocks carrying it, as of the last flush."""
        with self._lock:
            return dict(self._cached)

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> tuple[KvEventSubscription, list[int]]:
        """A new subscriber, and the hashes cached when it joined: every later change reaches it."""
        subscriber = KvEventSubscription(loop, self.max_queued_hashes)
        with self._lock:
            self._subscribers.append(subscriber)
            return subscriber, list(self._cached)

    def unsubscribe(self, subscriber: KvEventSubscription) -> None:
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

    async def next_runs(self, subscriber: KvEventSubscription, timeout: float) -> list[Run] | None:
        """What `subscriber` has not read yet (see KvEventSubscription.next_runs)."""
        return await subscriber.next_runs(self._lock, timeout)

    @property
    def num_subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)
