"""A standard-library HTTP server on a thread, for tests that need a peer that is not pdlaunch."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer

JOIN_TIMEOUT_S = 20.0  # the server thread ends once serve_forever returns: seconds on a loaded machine


@contextmanager
def served(server: ThreadingHTTPServer) -> Iterator[str]:
    """`server` (bound already) serving on a daemon thread: its base URL; shut down, closed and its thread joined on
    the way out."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(JOIN_TIMEOUT_S)
