"""The proxy's KV event feed holds at most MAX_LINE_BYTES of one line: an instance (or anything answering on its
port) that sends a line without end has its stream dropped and re-opened, as a bad event is, rather than the
proxy buffering all it is sent. Over real HTTP from a small server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

import pdlaunch.proxy.kv_events as feed_module
from pdlaunch.kvcache.events import KvSnapshot, prompt_block_hashes
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.kv_events import LineTooLong, ndjson_lines
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
