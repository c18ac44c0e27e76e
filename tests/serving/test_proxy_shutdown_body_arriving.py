"""The proxy's side of tests/serving/test_shutdown_body_arriving.py: a request whose body is still arriving when the
proxy's drain at shutdown runs out is answered 503 shutting_down with Retry-After (http/shutdown_answer.py), as every
other request the drain cuts. It waited in BodyLimit, outside ShutdownAnswer: nothing cut it, and uvicorn's deadline
then cancelled it (a bare 500 and a traceback in the log). The proxy app's ASGI stack as proxy/app.py builds it."""

from __future__ import annotations

import asyncio
import json

from starlette.types import Message

from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import InstancePool

TIMEOUT_S = 10.0  # well below BodyLimit's 30 s wait for a stalled body


def test_a_request_whose_body_still_arrives_when_the_proxys_drain_ends_gets_503_shutting_down() -> None:
    app = build_proxy_app(InstancePool([]), 60.0)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
        "scheme": "http",
        "server": ("127.0.0.1", 1),
        "client": ("127.0.0.1", 2),
    }

    async def run() -> list[Message]:
        sent: list[Message] = []
        part_read = asyncio.Event()

        async def receive() -> Message:
            if not part_read.is_set():
                part_read.set()
                return {"type": "http.request", "body": b'{"prompt": "hel', "more_body": True}
            await asyncio.Event().wait()  # the rest of the body never comes
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            sent.append(message)

        request = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.wait_for(part_read.wait(), TIMEOUT_S)
        app.state.proxy_state.proxy.stopping.set()  # the drain's end (http/draining_server.py)
        await asyncio.wait_for(request, TIMEOUT_S)
        return sent

    sent = asyncio.run(run())
    assert sent and sent[0]["type"] == "http.response.start", sent
    assert sent[0]["status"] == 503, sent
    assert (b"retry-after", b"1") in sent[0]["headers"], sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "shutting_down", sent[1]
