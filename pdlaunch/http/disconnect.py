"""The client's disconnect while an answer is being made (instance server and proxy alike).

A handler that waits (for the engine, for an upstream instance) races that wait against the client
closing its connection: when the client leaves first, the wait is cancelled and ClientDisconnected
raised, so the handler frees what the request holds (engine slots, held KV) and answers CLIENT_CLOSED,
which nobody reads. A streamed answer is watched by the response itself (sse.ClosingStreamingResponse).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

from starlette.requests import Request

CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; never seen by the client

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


class DisconnectWatch:
    """Watches one request's connection from when it is made until it is closed (a context manager).

    Start it after the body is read: from then on the only message the connection delivers is
    `http.disconnect`.
    """

    def __init__(self, request: Request) -> None:
        self._watch = asyncio.ensure_future(_wait_disconnect(request))

    @property
    def gone(self) -> bool:
        """True once the client has closed the connection."""
        return self._watch.done() and not self._watch.cancelled()

    async def run(self, work: Awaitable[T], discard: Callable[[T], Awaitable[None]] | None = None) -> T:
        """The result of `work` (or its exception). Raises ClientDisconnected when the client leaves
        first; `work` is then cancelled and has ended. Cancelling the caller cancels `work` too.
        `discard`: what to do with a result nobody will read, one `work` returned as the caller was
        cancelled or the client left (an open upstream stream would hold its instance's in-flight count
        and its request forever): `work` is then awaited to its end first."""
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task, self._watch}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            if discard is not None:
                await _discard_result(task, discard)
            raise
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # cancelled or failed: the client is gone either way
        if discard is not None:
            await _discard_result(task, discard)
        raise ClientDisconnected

    def close(self) -> None:
        self._watch.cancel()

    def __enter__(self) -> DisconnectWatch:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


async def _discard_result(task: asyncio.Future[T], discard: Callable[[T], Awaitable[None]]) -> None:
    """`task` awaited to its end, and its result, if it has one, handed to `discard`."""
    await asyncio.gather(task, return_exceptions=True)
    if not task.cancelled() and task.exception() is None:
        await discard(task.result())


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
