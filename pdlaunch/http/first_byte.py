"""Time to first byte of an answer, as a server sees it: from the request reaching the app (its headers parsed,
before the body is read) to the first non-empty piece of the answer's body handed to the server. For a stream
that is its first event, for a whole answer the answer. Only POSTs to the OpenAI API (`/v1/...`) answered 2xx
are timed: the completions a client waits for, not probes, scrapes, internal calls or refusals.

The proxy's and an instance's series split the time outside the engine (`benchmarks/serve_probe.py` prints
both): the client's TTFT less the proxy's is the client and its hop; the proxy's less the instance's is the
proxy's own work and its hop to the instance; the instance's less its own time to first token
(`pdlaunch_time_to_first_token_seconds`, request added to token out of the engine) is its HTTP side.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdlaunch.http.asgi import HTTPMiddleware


class FirstByteTimer(HTTPMiddleware):
    """Observes `histogram` (labelled by `label(path)`, or unlabelled when `label` is None) once per timed
    request, at the first non-empty body piece of a 2xx answer to a POST under /v1/."""

    def __init__(self, app: ASGIApp, histogram: Histogram, label: Callable[[str], str] | None = None) -> None:
        super().__init__(app)
        self.histogram = histogram
        self.label = label

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") != "POST" or not str(scope.get("path", "")).startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        state = {"ok": False, "seen": False}

        async def timing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["ok"] = 200 <= int(message["status"]) < 300
            elif message["type"] == "http.response.body" and state["ok"] and not state["seen"] and message.get("body"):
                state["seen"] = True
                elapsed = time.monotonic() - start
                if self.label is None:
                    self.histogram.observe(elapsed)
                else:
                    self.histogram.labels(self.label(scope.get("path", ""))).observe(elapsed)
            await send(message)

        await self.app(scope, receive, timing_send)
