"""A streamed answer whose client stops reading ends (the instance's streams and the proxy's alike).

A client that keeps its connection open but reads nothing fills the connection's buffers, and from then on each
send of its stream waits. Nothing bounded that wait: the request went on (an instance's engine generating into
its queue to the last token), then its handler, its queued output and its connection stayed forever. A send that
waits SEND_STALL_SECONDS ends the stream instead, unfinished, as when the client leaves; a reader that keeps up
at all drains the buffers well within it. The wait is timed by one check per stream, not a timer per send: the
proxy relays each event of every stream through here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from starlette.types import Message, Send

SEND_STALL_SECONDS = 60.0
CHECKS_PER_STALL = 4  # a stalled stream ends between 1 and 1 + 1/CHECKS_PER_STALL times SEND_STALL_SECONDS
# What uvicorn's protocols log at ERROR when an app returns before its response ended, and where.
INCOMPLETE_RESPONSE_ERROR = "ASGI callable returned without completing response."
UVICORN_ERROR_LOGGER = "uvicorn.error"

# Set in the task that serves one request (uvicorn awaits the app in that task and logs the error there, so the
# value is visible to the log filter): that request's stream ended because its client read nothing.
_ended_unread: ContextVar[bool] = ContextVar("pdlaunch_stream_ended_unread", default=False)


class _QuietUnreadStreams(logging.Filter):
    """Drops uvicorn's incomplete-response ERROR of a stream that ended because its client stopped reading (our
    own warning said so); the same error from any other response still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_ended_unread.get() and record.getMessage() == INCOMPLETE_RESPONSE_ERROR)


_FILTER = _QuietUnreadStreams()


def quiet_incomplete_response_error() -> None:
    """For the request being served in this task: its unfinished response is expected, not an ERROR. The filter is
    added here, after uvicorn configured its loggers, and once."""
    _ended_unread.set(True)
    logger = logging.getLogger(UVICORN_ERROR_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


async def stream_while_read(stream: Callable[[Send], Awaitable[None]], send: Send) -> bool:
    """`stream(send)` (it sends an answer), with each send timed: True once it ended by itself (its exception
    raised), False when a send waited SEND_STALL_SECONDS: `stream` was then cancelled and has ended."""
    loop = asyncio.get_running_loop()
    waiting_since: float | None = None

    async def timed_send(message: Message) -> None:
        nonlocal waiting_since
        waiting_since = loop.time()
        try:
            await send(message)
        finally:
            waiting_since = None

    task = asyncio.ensure_future(stream(timed_send))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=SEND_STALL_SECONDS / CHECKS_PER_STALL)
            if done:
                task.result()
                return True
            if waiting_since is not None and loop.time() - waiting_since >= SEND_STALL_SECONDS:
                return False
    finally:
        if not task.done():  # stalled, or the caller was cancelled
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
