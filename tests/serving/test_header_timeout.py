"""An instance served as its process serves it (server/__main__.py's uvicorn settings, the tiny model) closes a
connection whose request headers do not come in time (http/header_timeout.py): a client that connects and sends
nothing, or its headers a piece at a time, held a connection and a file descriptor forever."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from pdlaunch.config.deployment_config import InstanceSpec
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.http import header_timeout
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.server.__main__ import server_config
from pdlaunch.server.app import build_app
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import ThreadServer, tiny_colocated, wait_for

TIMEOUT_S = 1.0  # the bound under test
SOCKET_TIMEOUT_S = 60.0  # far past it: a connection still open then fails the test instead of hanging it


@pytest.fixture(scope="module")
def address() -> Iterator[tuple[str, int]]:
    cfg = tiny_colocated(256)
    port = PortAllocator("127.0.0.1").free("header timeout test")
    spec = InstanceSpec(role="colocated", port=port, engine_id="test-header-timeout-0")
    app = build_app(EngineLoop(lambda: LLMEngine(cfg, spec), max_pending_requests=4), cfg, spec)
    with ThreadServer(app, port, config=server_config(app, "127.0.0.1", port)) as srv:
        wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 200, "the engine to load", 120)
        yield "127.0.0.1", port


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(header_timeout, "HEADER_TIMEOUT_SECONDS", TIMEOUT_S)


def connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=SOCKET_TIMEOUT_S)


def read_to_close(conn: socket.socket) -> bytes:
    """Every byte the server sends until it closes the connection (socket.timeout if it never does)."""
    received = b""
    while chunk := conn.recv(65536):
        received += chunk
    return received


def request(path: str, body: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def assert_408(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "timeout_error", error
    assert error["message"] == f"the request's headers did not all arrive within {TIMEOUT_S:g} s", error


def test_a_connection_that_sends_nothing_is_closed(address: tuple[str, int]) -> None:
    with connect(address) as conn:
        assert read_to_close(conn) == b""


def test_headers_that_stop_arriving_are_answered_408(address: tuple[str, int]) -> None:
    with connect(address) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n")
        assert_408(read_to_close(conn))


def test_a_kept_alive_connection_gets_the_same_bound_for_its_next_request(address: tuple[str, int]) -> None:
    with connect(address) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        first = b""
        while not first.endswith(b"}"):
            first += conn.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first
        conn.sendall(b"GET /health HTTP/1.1\r\nHo")
        assert_408(read_to_close(conn))


def test_headers_in_pieces_and_a_body_slower_than_the_bound_are_served(address: tuple[str, int]) -> None:
    body = json.dumps({"prompt": "hello", "max_tokens": 2}).encode()
    head, _, _ = request("/v1/completions", body).partition(b"\r\n\r\n")
    with connect(address) as conn:
        conn.sendall(head[:20])
        time.sleep(TIMEOUT_S / 4)  # pieces of one request, well within the bound
        conn.sendall(head[20:] + b"\r\n\r\n")
        time.sleep(TIMEOUT_S * 2)  # the body's wait is BodyLimit's (30 s), not this one
        conn.sendall(body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = conn.recv(65536)
            assert chunk, f"the connection closed after {answer!r}"
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["usage"]["completion_tokens"] == 2


def test_a_body_still_arriving_after_its_answer_gets_the_same_bound(address: tuple[str, int]) -> None:
    """A request answered before its body was read (refused by access control, past the size limit) whose client then
    sends a byte of that body now and then held the connection forever: each byte cancelled uvicorn's keep-alive
    timeout and nothing armed another."""
    with connect(address) as conn:
        conn.sendall(b"POST /sleep HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n")  # refused, body unread
        answer = b""
        while not answer.endswith(b"}"):
            chunk = conn.recv(65536)
            assert chunk, f"the connection closed after {answer!r}"
            answer += chunk
        assert answer.startswith((b"HTTP/1.1 401 ", b"HTTP/1.1 403 ")), answer
        conn.sendall(b"{")  # one byte of the 100 announced, then nothing
        start = time.monotonic()
        assert read_to_close(conn) == b""
    assert time.monotonic() - start < SOCKET_TIMEOUT_S / 2
