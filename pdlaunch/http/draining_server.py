"""uvicorn's server that tells the app when its shutdown begins (the proxy's and an instance's alike).

uvicorn tells the app (the lifespan's shutdown) only once every connection has closed or its graceful-shutdown
deadline has cancelled what was left; the app learns earlier here, so that it can end the requests still running
with an answer of its own before that deadline (http/shutdown_answer.py), not a bare 500 and a traceback.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn


class DrainingServer(uvicorn.Server):
    """Calls `on_shutdown`, on the serving loop, as the shutdown begins, whatever began it: a signal (SIGTERM,
    Ctrl-C), or `should_exit` set by the process (its parent gone, a fatal engine error, a Ray actor's stop)."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_shutdown()
        await super().shutdown(sockets)
