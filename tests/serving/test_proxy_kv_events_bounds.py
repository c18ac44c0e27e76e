"""The proxy's KV event feed holds at most MAX_LINE_BYTES of one line: an instance (or anything answering on its
port) that sends a line without end has its stream dropped and re-opened, as a bad event is, rather than the
proxy buffering all it is sent. Over real HTTP from a small server. The set of one instance's cached blocks is
bounded too, also where the instance names no bound of its own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

import pdlaunch.proxy.kv_events as feed_module
from pdlaunch.kvcache.events import KvSnapshot, KvStored, prompt_block_hashes
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.kv_events import CachedBlocks, LineTooLong, ndjson_lines
from tests.serving.helpers import ThreadServer, follow_decode_feed

LIMIT = 64 << 10
HASHES = prompt_block_hashes(list(range(64)), 4)


def _snapshot(hashes: list[str]) -> bytes:
    return KvSnapshot(seq=0, engine_id="e", block_size=4, hashes=hashes).model_dump_json().encode() + b"\n"


class EndlessLine:
    """/v1/kv_events: the first connection sends a snapshot, then a line that never ends (1 MiB at once, then a
    byte every 0.2 s, which no read timeout ends); later ones a snapshot of more blocks, then heartbeats."""

    def __init__(self) -> None:
        self.connections = 0
        self.stop = threading.Event()
        self.app = FastAPI()
        self.app.get("/v1/kv_events")(self.kv_events)

    async def kv_events(self) -> Any:
        first = self.connections == 0
        self.connections += 1

        async def lines() -> AsyncIterator[bytes]:
            yield _snapshot(HASHES[:2] if first else HASHES[:5])
            if first:
                yield b'{"type": "stored", "seq": 1, "hashes": ["' + b"a" * (1 << 20)
            while not self.stop.is_set():
                await asyncio.sleep(0.2)
                yield b"a" if first else b"\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")


def test_a_line_without_end_drops_the_stream_and_it_is_reopened(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feed_module, "MAX_LINE_BYTES", LIMIT)
    fake = EndlessLine()
    with ThreadServer(fake.app, PortAllocator("127.0.0.1").free("fake")) as server:
        # the second stream's snapshot, after 0.5 s of backoff (30 s at most)
        hashes = follow_decode_feed(server.url, lambda cached: cached.hashes == set(HASHES[:5]), fake.stop)
        assert hashes == set(HASHES[:5])
    assert fake.connections == 2


async def _chunks(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _collect(chunks: AsyncIterator[bytes], limit: int) -> list[bytes]:
    return [line async for line in ndjson_lines(chunks, limit)]


def test_lines_are_split_across_and_within_chunks() -> None:
    lines = asyncio.run(_collect(_chunks(b'{"a"', b":1}\n\n{", b'"b":2}\n{"c":3}\r\n', b"tail"), 16))
    assert lines == [b'{"a":1}', b"", b'{"b":2}', b'{"c":3}\r', b"tail"]


@pytest.mark.parametrize("chunks", [(b"x" * 20 + b"\n",), (b"x" * 10, b"x" * 10), (b"ok\n" + b"x" * 17,)],
                         ids=["whole-in-one-chunk", "unended-across-chunks", "unended-after-a-line"])
def test_a_line_past_the_limit_is_refused(chunks: tuple[bytes, ...]) -> None:
    with pytest.raises(LineTooLong):
        asyncio.run(_collect(_chunks(*chunks), 16))


@pytest.mark.parametrize("num_blocks", [None, 1 << 40], ids=["no-bound-named", "a-bound-past-the-proxys"])
def test_a_set_past_what_the_proxy_keeps_is_a_broken_stream(monkeypatch: pytest.MonkeyPatch,
                                                            num_blocks: int | None) -> None:
    """An older instance names no num_blocks and a broken one any: `stored` events grew the set without end."""
    monkeypatch.setattr(feed_module, "MAX_CACHED_HASHES", 4)
    cached = CachedBlocks()
    assert cached.apply(KvSnapshot(seq=0, engine_id="e", block_size=4, hashes=HASHES[:2], num_blocks=num_blocks)) \
        is None
    assert cached.apply(KvStored(seq=1, hashes=HASHES[2:4])) is None
    assert cached.apply(KvStored(seq=2, hashes=HASHES[4:5])) == \
        "5 cached blocks, more than the 4 the proxy keeps of an instance"
    assert CachedBlocks().apply(KvSnapshot(seq=0, engine_id="e", block_size=4, hashes=HASHES[:5]))


def test_the_proxy_keeps_as_many_hashes_as_the_longest_snapshot_names() -> None:
    """The bound refuses no set that a snapshot within MAX_LINE_BYTES can name: one naming a hash more is longer."""
    line = KvSnapshot(seq=0, engine_id="e", block_size=4, hashes=HASHES[:1] * 1000).model_dump_json().encode()
    per_hash = len(line) // 1000  # '"<32 hex digits>",'
    assert per_hash == 35 and (feed_module.MAX_CACHED_HASHES + 1) * per_hash > feed_module.MAX_LINE_BYTES
