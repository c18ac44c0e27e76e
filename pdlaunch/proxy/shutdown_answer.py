"""The answer of a request the drain at shutdown cuts before its response began: a 503 JSON error with code
shutting_down and Retry-After, rather than uvicorn's bare `500 Internal Server Error` and a traceback in the log
when its graceful-shutdown deadline cancels the request's task.

When the proxy's `stopping` event is set (upstream.Proxy.begin_shutdown: the drain less a margin), every request
whose response has not started is cancelled in its own task and answered so; a stream already under way ends
with its own shutting_down event (upstream.py). A request that arrives after that is answered so at once.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdlaunch.http.asgi import HTTPMiddleware
from pdlaunch.http.retry_later import RetryLater

# The client's retry goes to a running server (another replica behind the load balancer, or this one restarted).
SHUTTING_DOWN_RETRY_AFTER_S = 1


def shutting_down() -> RetryLater:
    return RetryLater("the server is shutting down: this request ended before it finished; retry on a running "
                      "server", code="shutting_down", retry_after_s=SHUTTING_DOWN_RETRY_AFTER_S)


class ShutdownAnswer(HTTPMiddleware):
    """Answers the requests still waiting for their response when `stopping` is set (module doc)."""

    def __init__(self, app: ASGIApp, stopping: asyncio.Event) -> None:
        super().__init__(app)
        self.stopping = stopping
        self._waiting: set[asyncio.Task[object]] = set()  # requests whose response has not started
        self._cut: set[asyncio.Task[object]] = set()  # those cancelled here: their CancelledError is ours
        self._watch: asyncio.Task[Literal[True]] | None = None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if self.stopping.is_set() or task is None:
            if task is None:  # not run by asyncio: nothing to cancel
                await self.app(scope, receive, send)
            else:
                await shutting_down().response()(scope, receive, send)
            return
        if self._watch is None:  # one watch per process, on the serving loop
            watch = self._watch = asyncio.ensure_future(self.stopping.wait())
            watch.add_done_callback(self._cut_waiting)
        started = False

        async def send_started(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self._waiting.discard(task)
            await send(message)

        cancelling = task.cancelling()
        self._waiting.add(task)
        try:
            await self.app(scope, receive, send_started)
        except asyncio.CancelledError:
            # Ours alone (not the client gone or uvicorn's own deadline) and nothing sent yet: the 503.
            if task not in self._cut or task.uncancel() > cancelling or started:
                raise
            await shutting_down().response()(scope, receive, send)
        finally:
            self._waiting.discard(task)
            self._cut.discard(task)

    def _cut_waiting(self, watch: asyncio.Task[Literal[True]]) -> None:
        if watch.cancelled():
            return
        for task in self._waiting:
            self._cut.add(task)
            task.cancel(msg="the drain at shutdown ended before this request's response began")
        self._waiting.clear()
