"""A response's head goes out with the start of its body (http/held_head.py): uvicorn wrote them in two sends, and
the reader (the proxy, reading a prefill's answer) woke for the head, then again for the body. A stream's head still
leaves at the end of the loop iteration, its events at once, and a head written before the connection closes goes
before the close."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from pdlaunch.http.header_timeout import HeaderTimeoutProtocol
from pdlaunch.http.held_head import HeldHeadTransport

HEAD = b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\n"


class Recording(asyncio.Transport):
    """A transport that records what is sent through it."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data:  # as asyncio's socket transport: an empty write sends nothing
            self.sent.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_a_head_and_its_body_go_out_in_one_send() -> None:
    async def run() -> list[bytes]:
        recording = Recording()
        held = HeldHeadTransport(recording, asyncio.get_running_loop())
        held.write(HEAD)
        held.write(b"{}")
        await asyncio.sleep(0)
        return recording.sent

    assert asyncio.run(run()) == [HEAD + b"{}"]


def test_a_head_alone_leaves_at_the_end_of_the_iteration_and_events_at_once() -> None:
    async def run() -> None:
        recording = Recording()
        held = HeldHeadTransport(recording, asyncio.get_running_loop())
        held.write(HEAD)
        assert recording.sent == []
        await asyncio.sleep(0)
        assert recording.sent == [HEAD]
        held.write(b"data: 1\n\n")
        assert recording.sent == [HEAD, b"data: 1\n\n"]

    asyncio.run(run())


def test_a_head_written_before_a_close_goes_first() -> None:
    async def run() -> None:
        recording = Recording()
        held = HeldHeadTransport(recording, asyncio.get_running_loop())
        held.write(HEAD + b"{}")
        held.close()
        assert recording.sent == [HEAD + b"{}"] and recording.closed
        await asyncio.sleep(0)
        assert recording.sent == [HEAD + b"{}"]  # sent once

    asyncio.run(run())


async def _json_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


def test_the_servers_protocol_answers_a_json_request_in_one_send() -> None:
    """uvicorn's own h11 path, as instances and the proxy serve (HeaderTimeoutProtocol)."""
    async def run() -> list[bytes]:
        config = uvicorn.Config(_json_app, lifespan="off", log_level="warning")
        protocol = HeaderTimeoutProtocol(config=config, server_state=ServerState(), app_state={})
        recording = Recording()
        protocol.connection_made(recording)
        protocol.data_received(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        for _ in range(100):  # the app's task runs, then the held head's end of iteration
            if recording.sent:
                break
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        protocol.connection_lost(None)
        return recording.sent

    sent = asyncio.run(run())
    assert len(sent) == 1, sent
    assert sent[0].startswith(b"HTTP/1.1 200 ") and sent[0].endswith(b"\r\n\r\n{}")
