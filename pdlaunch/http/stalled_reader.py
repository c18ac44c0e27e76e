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
from collections.abc import Awaitable, Callable

from starlette.types import Message, Send

SEND_STALL_SECONDS = 60.0
CHECKS_PER_STALL = 4  # a stalled stream ends between 1 and 1 + 1/CHECKS_PER_STALL times SEND_STALL_SECONDS


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
