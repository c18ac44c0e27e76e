"""The proxy, served with its process's uvicorn settings (proxy/__main__.py `proxy_server_config`), closes a
connection whose request headers do not come in time, as an instance does (http/header_timeout.py): a client that
connected and sent nothing held a connection and a file descriptor of the proxy forever."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from pdlaunch.http import header_timeout
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.__main__ import proxy_server_config
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import InstancePool
from tests.serving.helpers import ThreadServer, wait_for

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def address() -> Iterator[tuple[str, int]]:
    port = PortAllocator("127.0.0.1").free("proxy header timeout test")
    app = build_proxy_app(InstancePool([]), 60.0)
    with ThreadServer(app, port, config=proxy_server_config(app, "127.0.0.1", port, access_log=False,
                                                          drain_s=1)) as srv:
        wait_for(lambda: httpx.get(f"{srv.url}/ping").status_code in (200, 404), "the proxy to serve", 60)
        yield "127.0.0.1", port


def test_a_connection_that_sends_no_headers_is_closed(address: tuple[str, int],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(header_timeout, "HEADER_TIMEOUT_SECONDS", TIMEOUT_S)
    with socket.create_connection(address, timeout=60.0) as conn:
        start = time.monotonic()
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n")  # and never the rest
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        assert time.monotonic() - start < 30, "closed by the bound, not by something else later"
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
