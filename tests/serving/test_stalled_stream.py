"""A client that keeps its connection open but reads nothing of its stream (real HTTP, the tiny model in process):
once a send to it has waited SEND_STALL_SECONDS the stream ends and its request stops, as when the client leaves.
Before, the engine generated into its queue to the last token and the handler, the queued output and the
connection stayed forever."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.http import stalled_reader
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import in_process_instance, wait_for

# 8 samples of 2,000 tokens with 20 logprobs each: ~11 MB of events, past what the socket buffers of both ends hold
# (Linux grows a send buffer up to 4 MiB), so that sends wait; making them all takes the tiny model ~40 s.
N, MAX_TOKENS = 8, 2000


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, EngineLoop]]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": 2048}, "cache": {"num_gpu_blocks": 2560, "block_size": 8}})
    with in_process_instance(cfg, "test-stalled-stream-0") as served:
        yield served


def info(url: str) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{url}/info", timeout=30).json()
    return answer


def test_a_stream_nobody_reads_stops_its_request(server: tuple[str, EngineLoop], monkeypatch: pytest.MonkeyPatch,
                                                 uvicorn_errors: Records, pdlaunch_warnings: Records) -> None:
    url, _ = server
    monkeypatch.setattr(stalled_reader, "SEND_STALL_SECONDS", 1.0)
    aborted = info(url)["num_aborted_requests"]
    body = json.dumps({"prompt": "hello", "n": N, "max_tokens": MAX_TOKENS, "ignore_eos": True, "logprobs": 20,
                       "stream": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        conn.connect((host, int(port)))
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        # (no wait for it to start first: on a loaded machine it may start and be stopped between two polls)
        wait_for(lambda: info(url)["num_aborted_requests"] >= aborted + N, "the unread request's samples to be "
                 "aborted (not run to their end)", 300)
        ended = info(url)
        assert ended["num_pending_requests"] == 0 and ended["num_aborted_requests"] == aborted + N, ended
        drain_until_closed(conn, 120)  # uvicorn closes the connection after the app returned (and logged, if it does)
    # our own warning says what happened; uvicorn's "returned without completing response" ERROR would only alarm
    assert [r.getMessage() for r in uvicorn_errors.records if r.levelno >= logging.ERROR] == []
    assert any("read nothing of the stream" in r.getMessage() for r in pdlaunch_warnings.records)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def uvicorn_errors() -> Iterator[Records]:
    yield from _recorded("uvicorn.error")


@pytest.fixture
def pdlaunch_warnings() -> Iterator[Records]:
    yield from _recorded("pdlaunch.http")


def _recorded(name: str) -> Iterator[Records]:
    # a handler on the logger itself: uvicorn's loggers need not propagate to the root, where caplog listens
    handler, logger = Records(), logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def drain_until_closed(conn: socket.socket, timeout_s: float) -> None:
    """Read what the server sent until it closes the connection (at most `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            if not conn.recv(1 << 20):
                return
        except ConnectionResetError:
            return
        except TimeoutError:
            break
    raise AssertionError(f"the server did not close the stalled stream's connection within {timeout_s:g} s")
