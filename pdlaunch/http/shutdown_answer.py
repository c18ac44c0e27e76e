"""The answer of a request the drain at shutdown cuts (the proxy's and an instance's alike): a 503 JSON error with
code shutting_down and Retry-After, rather than uvicorn's bare `500 Internal Server Error` and a traceback in the log
when its graceful-shutdown deadline cancels the request's task.

When the app's `stopping` event is set (the drain less a margin: http/draining_server.py tells the app when shutdown
began), every request whose response has not started is cancelled in its own task and answered so. Where
`cut_streams` (an instance: its streams know nothing of the shutdown), a streamed body already under way (one without
Content-Length) is cut too and ends whole: an SSE stream with a shutting_down error event and [DONE], another (the
NDJSON KV events) after its last whole line; the proxy's streams end with their own event (proxy/upstream.py). The
instance's proxy gets the event too: it takes it for its decode gone and continues the stream on another decode where
it can, and passes it on to its client where it cannot (no other decode ready, the request not migratable, migration
off or past its limit: proxy/migrate.py), which only the proxy knows. A request that arrives after that is answered
the 503 at once.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdlaunch.http import JsonObject
from pdlaunch.http.asgi import HTTPMiddleware
from pdlaunch.http.errors import error_body
from pdlaunch.http.retry_later import RetryLater
from pdlaunch.http.sse import DONE, sse_event

# The client's retry goes to a running server (another replica behind the load balancer, another instance of the
# role, or this one restarted): the drain has run out, so no wait here would help.
SHUTTING_DOWN_RETRY_AFTER_S = 1
# Requests are cut this long before the server's graceful-shutdown deadline, so their answers are sent before
# uvicorn cancels what is left.
SHUTDOWN_MARGIN_S = 1.0
SHUTTING_DOWN_CODE = "shutting_down"  # the code of every answer a server that stops gives (the proxy's, an instance's)
SSE = b"text/event-stream"


def stream_cut_body() -> JsonObject:
    """The error event that ends a stream the drain at shutdown cut (an instance's, or the proxy's own)."""
    return error_body(503, "the server is shutting down: this stream ended before it finished; retry on a running "
                           "server", code=SHUTTING_DOWN_CODE)


# The end of an SSE stream the drain cut: its error event, then [DONE] (as every OpenAI stream's error event).
_STREAM_CUT = sse_event(stream_cut_body()) + DONE


def shutting_down(message: str = "the server is shutting down: this request ended before it finished; retry on a "
                                 "running server") -> RetryLater:
    """The 503 shutting_down, with its Retry-After, of a request a server that stops cuts or refuses."""
    return RetryLater(message, code=SHUTTING_DOWN_CODE, retry_after_s=SHUTTING_DOWN_RETRY_AFTER_S)


def stop_before_deadline(stopping: asyncio.Event, drain_s: float) -> None:
    """Shutdown began, with `drain_s` seconds of graceful drain: set `stopping` SHUTDOWN_MARGIN_S before its end."""
    asyncio.get_running_loop().call_later(max(0.0, drain_s - SHUTDOWN_MARGIN_S), stopping.set)


class ShutdownAnswer(HTTPMiddleware):
    """Answers the requests still running when `stopping` is set (module doc)."""

    def __init__(self, app: ASGIApp, stopping: asyncio.Event, cut_streams: bool = False) -> None:
        super().__init__(app)
        self.stopping = stopping
        self.cut_streams = cut_streams
        self._running: set[asyncio.Task[object]] = set()  # requests whose response has not started, or streams
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
            watch.add_done_callback(self._cut_running)
        started = stream = sse = ended = False

        async def send_tracked(message: Message) -> None:
            nonlocal started, stream, sse, ended
            if message["type"] == "http.response.start":
                started = True
                headers = dict(message.get("headers", []))
                stream = self.cut_streams and b"content-length" not in headers
                sse = headers.get(b"content-type", b"").startswith(SSE)
                if not stream:
                    self._running.discard(task)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
                self._running.discard(task)
            await send(message)

        cancelling = task.cancelling()
        self._running.add(task)
        try:
            await self.app(scope, receive, send_tracked)
        except asyncio.CancelledError:
            # Ours alone (not the client gone or uvicorn's own deadline), and the answer not yet ended: say why.
            if task not in self._cut or task.uncancel() > cancelling or ended or (started and not stream):
                raise
            if not started:
                await shutting_down().response()(scope, receive, send)
            else:  # a stream's sends are whole events (lines): one cancelled waited before it wrote anything
                await send({"type": "http.response.body", "body": _STREAM_CUT if sse else b"", "more_body": False})
        finally:
            self._running.discard(task)
            self._cut.discard(task)

    def _cut_running(self, watch: asyncio.Task[Literal[True]]) -> None:
        if watch.cancelled():
            return
        for task in self._running:
            self._cut.add(task)
            task.cancel(msg="the drain at shutdown ended before this request's answer did")
        self._running.clear()
