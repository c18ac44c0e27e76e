"""The proxy sends a request to an instance in one piece (proxy/held_writes.py): httpcore wrote its head and its body
in two sends, and the instance woke for each. A failed held send is dropped for the read, as httpcore drops a failed
send, and a large body still goes out as it is written."""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import httpcore
import httpx
import pytest

from pdlaunch.proxy import held_writes
from pdlaunch.proxy.app import instance_transports
from pdlaunch.proxy.instances import Instance, InstancePool

TIMEOUT_S = 30.0


class CountingBackend(httpcore.AnyIOBackend):
    """httpcore's asyncio backend, counting the sends of its streams."""

    sends: list[int] = []

    async def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        stream = await super().connect_tcp(*args, **kwargs)
        write = stream.write

        async def counted(buffer: bytes, timeout: float | None = None) -> None:
            CountingBackend.sends.append(len(buffer))
            await write(buffer, timeout)

        stream.write = counted  # type: ignore[method-assign]
        return stream


async def _answer_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A bare instance: reads each request whole, answers it with the length of the body it got."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            break
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = json.dumps({"got": len(await reader.readexactly(length))}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
    writer.close()


def test_a_request_goes_to_an_instance_in_one_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpcore, "AnyIOBackend", CountingBackend)
    CountingBackend.sends = []

    async def run() -> list[int]:
        server = await asyncio.start_server(_answer_json, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = InstancePool([Instance(role="prefill", url=url, name="prefill-0", state="ready")], "round_robin")
        async with server, httpx.AsyncClient(mounts=instance_transports(pool, httpx.Limits()),
                                             timeout=TIMEOUT_S) as client:
            for size in (10, 5000):  # two requests on one kept-alive connection
                answer = await client.post(f"{url}/v1/completions", json={"prompt": "x" * size})
                assert answer.status_code == 200 and answer.json()["got"] > size
        return CountingBackend.sends

    sends = asyncio.run(run())
    assert len(sends) == 2, sends  # one per request: its head and body together


class FailingStream(httpcore.AsyncNetworkStream):
    """A connection the instance closed: sends fail, reads find its end."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.writes.append(buffer)
        raise httpcore.WriteError("connection reset by peer")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return b""

    async def aclose(self) -> None:
        pass


def test_a_failed_held_send_is_dropped_for_the_read() -> None:
    async def run() -> tuple[bytes, list[bytes]]:
        inner = FailingStream()
        stream = held_writes.HeldWritesStream(inner)
        await stream.write(b"POST / HTTP/1.1\r\n\r\n")
        await stream.write(b"{}")
        assert inner.writes == []  # held until the answer is read
        return await stream.read(1024), inner.writes

    got, writes = asyncio.run(run())
    assert got == b"" and writes == [b"POST / HTTP/1.1\r\n\r\n{}"]


class RecordingStream(FailingStream):
    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.writes.append(buffer)


def test_a_large_body_goes_out_as_it_is_written() -> None:
    async def run() -> list[bytes]:
        inner = RecordingStream()
        stream = held_writes.HeldWritesStream(inner)
        await stream.write(b"head")
        await stream.write(b"x" * held_writes.HELD_BYTES)
        await stream.write(b"tail")
        sent_before_read = list(inner.writes)
        await stream.read(1)
        return [*sent_before_read, b"|", *inner.writes[len(sent_before_read):]]

    assert asyncio.run(run()) == [b"head" + b"x" * held_writes.HELD_BYTES, b"|", b"tail"]


def test_a_transport_loads_the_certificate_authorities_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An SSL context (the CA bundle loaded) takes ~50 ms to build: the proxy builds a transport per instance in
    each worker at start, and the replaced pool's context was a second one, built and thrown away."""
    built: list[ssl.SSLContext] = []
    create = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(create(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(ssl, "create_default_context", counted)
    held_writes.held_writes_transport(httpx.Limits())
    assert len(built) == 1
