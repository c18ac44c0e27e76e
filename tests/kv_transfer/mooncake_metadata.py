"""Mooncake's own HTTP metadata server (mooncake.http_metadata_server, what kv_transfer.mooncake_metadata_server
names on clusters) in a child process, for the tests of engines that find each other through it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.helpers.ports import free_port

START_TIMEOUT_S = 30.0  # a Python child importing aiohttp on a loaded 2-core machine


@contextmanager
def metadata_server() -> Iterator[str]:
    """The URL of a running metadata server (`http://127.0.0.1:PORT/metadata`), stopped on the way out."""
    pytest.importorskip("aiohttp", reason="Mooncake's HTTP metadata server needs aiohttp")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mooncake.http_metadata_server", "--host", "127.0.0.1",
                               "--port", str(port), "--log-level", "WARNING"], stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/metadata"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # until the server answers (any HTTP status)
            try:
                httpx.get(url, params={"key": "probe"}, timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None, f"Mooncake's metadata server exited with {server.returncode}"
                assert time.monotonic() < deadline, f"no metadata server answered within {START_TIMEOUT_S}s"
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(10)
