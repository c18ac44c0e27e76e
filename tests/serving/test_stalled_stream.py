"""A client that keeps its connection open but reads nothing of its stream (real HTTP, the tiny model in process):
once a send to it has waited SEND_STALL_SECONDS the stream ends and its request stops, as when the client leaves.
Before, the engine generated into its queue to the last token and the handler, the queued output and the
connection stayed forever."""

from __future__ import annotations

import json
import socket
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


def test_a_stream_nobody_reads_stops_its_request(server: tuple[str, EngineLoop],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
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
