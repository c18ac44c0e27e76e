"""stream_while_read (http/stalled_reader.py): a stream whose sends wait too long is ended; a slow reader that
keeps reading is not."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message, Send

from pdlaunch.http import stalled_reader
from pdlaunch.http.stalled_reader import stream_while_read

STALL_S = 0.4


@pytest.fixture(autouse=True)
def short_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stalled_reader, "SEND_STALL_SECONDS", STALL_S)


class Stream:
    """Sends `events` messages; records how it ended."""

    def __init__(self, events: int) -> None:
        self.events = events
        self.sent = 0
        self.ended = ""

    async def __call__(self, send: Send) -> None:
        try:
            for _ in range(self.events):
                await send({"type": "http.response.body", "body": b"x", "more_body": True})
                self.sent += 1
            self.ended = "finished"
        except asyncio.CancelledError:
            self.ended = "cancelled"
            raise


def test_a_slow_reader_that_keeps_reading_gets_the_whole_stream() -> None:
    async def slow_send(_: Message) -> None:
        await asyncio.sleep(STALL_S / 4)  # the client's pace: each send waits, none for long

    stream = Stream(12)  # three times the stall bound in all
    assert asyncio.run(stream_while_read(stream, slow_send)) is True
    assert (stream.sent, stream.ended) == (12, "finished")


def test_a_send_that_never_completes_ends_the_stream() -> None:
    async def stalled_after_two(_: Message) -> None:
        stalled_after_two.calls += 1  # type: ignore[attr-defined]
        if stalled_after_two.calls > 2:  # type: ignore[attr-defined]
            await asyncio.Event().wait()  # the client's buffers are full: never drained

    stalled_after_two.calls = 0  # type: ignore[attr-defined]
    stream = Stream(1000)

    async def run() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await asyncio.wait_for(stream_while_read(stream, stalled_after_two), 60)
        return result, loop.time() - start

    result, elapsed = asyncio.run(run())
    assert result is False
    assert (stream.sent, stream.ended) == (2, "cancelled")
    assert elapsed >= STALL_S


def test_the_streams_error_is_raised() -> None:
    async def failing(send: Send) -> None:
        raise ValueError("the stream failed")

    async def send(_: Message) -> None:
        pass

    with pytest.raises(ValueError, match="the stream failed"):
        asyncio.run(stream_while_read(failing, send))


def test_cancelling_the_caller_cancels_the_stream() -> None:
    async def never(_: Message) -> None:
        await asyncio.Event().wait()

    stream = Stream(1)

    async def run() -> None:
        task = asyncio.ensure_future(stream_while_read(stream, never))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert stream.ended == "cancelled"


def test_only_the_unread_streams_incomplete_response_error_is_quieted() -> None:
    import contextvars
    import logging

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger(stalled_reader.UVICORN_ERROR_LOGGER)
    handler = Keep()
    logger.addHandler(handler)
    try:
        def unread_request() -> None:  # one request's task: its stream ended unread, then uvicorn logs
            stalled_reader.quiet_incomplete_response_error()
            logger.error(stalled_reader.INCOMPLETE_RESPONSE_ERROR)
            logger.error("another error of the same request")

        contextvars.copy_context().run(unread_request)
        logger.error(stalled_reader.INCOMPLETE_RESPONSE_ERROR)  # any other request's: still an error
    finally:
        logger.removeHandler(handler)
    assert seen == ["another error of the same request", stalled_reader.INCOMPLETE_RESPONSE_ERROR]
