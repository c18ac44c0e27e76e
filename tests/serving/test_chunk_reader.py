"""The proxy's ChunkReader (proxy/upstream.py): an upstream's chunks read in the relaying task, a read ended
by the request's deadline or a watched event (a stall, the shutdown drain's end), never the task's other
awaits (the client's write), and a cancellation from outside (the client left) left as it is."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from pdlaunch.proxy.upstream import ChunkReader, Interrupted


class _Feed(httpx.AsyncByteStream):
    """A response body whose chunks the test puts in; None ends it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


def _response(feed: _Feed) -> httpx.Response:
    return httpx.Response(200, stream=feed)


def _run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_chunks_then_the_end() -> None:
    async def main() -> list[bytes | None]:
        feed = _Feed()
        reader = ChunkReader(_response(feed), time.monotonic() + 30)
        for chunk in (b"data: 1\n\n", b"data: 2\n\n", None):
            feed.queue.put_nowait(chunk)
        got = [await reader.next() for _ in range(3)]
        reader.close()
        return got
    assert _run(main()) == [b"data: 1\n\n", b"data: 2\n\n", None]


def test_the_deadline_ends_a_read_that_waits() -> None:
    async def main() -> tuple[str, float]:
        reader = ChunkReader(_response(_Feed()), time.monotonic() + 0.2)
        start = time.monotonic()
        with pytest.raises(Interrupted) as stop:
            await reader.next()
        reader.close()
        return stop.value.reason, time.monotonic() - start
    reason, waited = _run(main())  # type: ignore[misc]
    assert reason == "deadline" and waited < 20


def test_an_event_ends_the_read_it_comes_in_and_the_task_goes_on() -> None:
    async def main() -> tuple[str, bool]:
        stalled = asyncio.Event()
        reader = ChunkReader(_response(_Feed()), time.monotonic() + 30, stalled=stalled)
        asyncio.get_running_loop().call_later(0.05, stalled.set)
        with pytest.raises(Interrupted) as stop:
            await reader.next()
        reader.close()
        await asyncio.sleep(0.01)  # the task was not left cancelled: it awaits on
        task = asyncio.current_task()
        return stop.value.reason, task is not None and task.cancelling() == 0
    assert _run(main()) == ("stalled", True)


def test_an_event_between_reads_spares_the_other_await_and_ends_the_next_read() -> None:
    async def main() -> tuple[bool, str]:
        feed, stopping = _Feed(), asyncio.Event()
        reader = ChunkReader(_response(feed), time.monotonic() + 30, stopping=stopping)
        feed.queue.put_nowait(b"data: 1\n\n")
        assert await reader.next() == b"data: 1\n\n"
        asyncio.get_running_loop().call_later(0.02, stopping.set)
        await asyncio.sleep(0.1)  # the client's write, say: the event comes during it and must not cancel it
        feed.queue.put_nowait(b"data: 2\n\n")
        with pytest.raises(Interrupted) as stop:
            await reader.next()
        reader.close()
        return True, stop.value.reason
    assert _run(main()) == (True, "stopping")


def test_a_cancellation_from_outside_stays_a_cancellation_even_with_an_event_at_once() -> None:
    async def main() -> str:
        stalled = asyncio.Event()
        reader = ChunkReader(_response(_Feed()), time.monotonic() + 30, stalled=stalled)
        relaying = asyncio.ensure_future(reader.next())
        await asyncio.sleep(0.02)
        relaying.cancel()  # the client left ...
        reader._interrupt("stalled")  # ... and in the same tick the stall's callback ran (stalled.set() runs it later)
        try:
            await relaying
        except asyncio.CancelledError:
            return "cancelled"
        except Interrupted as stop:
            return f"interrupted: {stop.reason}"
        finally:
            reader.close()
        return "answered"
    assert _run(main()) == "cancelled"


def test_close_drops_the_timer_and_the_watches() -> None:
    async def main() -> bool:
        stalled = asyncio.Event()
        reader = ChunkReader(_response(_Feed()), time.monotonic() + 0.05, stalled=stalled)
        reader.close()
        stalled.set()
        await asyncio.sleep(0.1)
        return reader.reason is None
    assert _run(main())
