"""hop_overhead.py's client and reference: HTTP/1.1 over one raw socket (the lightest client, so what is timed is
the servers'), and a bare uvicorn app that answers with the bytes it was given."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

READY_TIMEOUT_S = 60.0

BARE_APP = textwrap.dedent('''
    import json, sys, uvicorn
    answer = {"body": b"", "events": None}
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/answer":  # what the next answers are: a JSON body, or stream events
            spec = json.loads(body)
            answer["body"], answer["events"] = spec["body"].encode(), spec["events"]
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if answer["events"] is None:
            size = str(len(answer["body"])).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", size)]})
            await send({"type": "http.response.body", "body": answer["body"]})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for event in answer["events"]:
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="h11", log_level="warning", access_log=False)
''')


class RawClient:
    """HTTP/1.1 on one kept-alive socket."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=READY_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data

    def _until(self, mark: bytes) -> bytes:
        while mark not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(mark, 1)
        return head

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def post(self, path: str, body: bytes) -> tuple[float, bytes, list[str] | None]:
        """(seconds to the first token: a whole answer's last byte or a stream's first `data: {` event, the
        answer's body, its stream events or None)."""
        start = time.perf_counter()
        self.sock.sendall(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                          b"\r\n%s" % (path.encode(), len(body), body))
        head = self._until(b"\r\n\r\n").decode("latin-1").lower()
        status = int(head.split(" ", 2)[1])
        if "transfer-encoding: chunked" not in head:
            length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
            data = self._exactly(length)
            if status != 200:
                raise RuntimeError(f"{path}: HTTP {status}: {data[:300]!r}")
            return time.perf_counter() - start, data, None
        first, events, data = None, [], b""
        while True:
            size = int(self._until(b"\r\n"), 16)
            chunk = self._exactly(size + 2)[:-2]
            if size == 0:
                break
            if first is None and chunk.startswith(b"data: {"):
                first = time.perf_counter() - start
            events.append(chunk.decode())
            data += chunk
        if status != 200 or first is None:
            raise RuntimeError(f"{path}: HTTP {status}, no data event: {data[:300]!r}")
        return first, data, events


@contextmanager
def bare_server() -> Iterator[str]:
    """The bare app on a free port: its URL; POST /answer {"body": TEXT, "events": [EVENT, ...] | null} sets what
    every other POST is answered with."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", BARE_APP, str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                httpx.post(f"{url}/answer", json={"body": "{}", "events": None}, trust_env=False, timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the bare uvicorn app did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
