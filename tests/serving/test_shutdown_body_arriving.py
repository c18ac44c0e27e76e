"""A request whose body is still arriving when an instance's drain at shutdown runs out is answered as every other
request the drain cuts: 503 shutting_down with Retry-After (http/shutdown_answer.py). It waited in BodyLimit, outside
ShutdownAnswer: nothing cut it, and uvicorn's deadline then cancelled it (a bare 500 and a traceback in the log).
The app's ASGI stack as server/app.py builds it, the request run in a task of its own as uvicorn runs it."""

from __future__ import annotations

import asyncio
import json

from starlette.types import Message

from pdlaunch.config.deployment_config import InstanceSpec
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.server.app import build_app
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import tiny_colocated

TIMEOUT_S = 10.0  # well below BodyLimit's 30 s wait for a stalled body


def test_a_request_whose_body_still_arrives_when_the_drain_ends_gets_503_shutting_down() -> None:
    cfg = tiny_colocated(256)
    spec = InstanceSpec(role="colocated", port=1, engine_id="test-shutdown-body-arriving-0")
    app = build_app(EngineLoop(lambda: LLMEngine(cfg, spec), max_pending_requests=4), cfg, spec)
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
        app.state.stopping.set()  # the drain's end (server/__main__.py: stop_before_deadline)
        await asyncio.wait_for(request, TIMEOUT_S)
        return sent

    sent = asyncio.run(run())
    assert sent and sent[0]["type"] == "http.response.start", sent
    assert sent[0]["status"] == 503, sent
    assert (b"retry-after", b"1") in sent[0]["headers"], sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "shutting_down", sent[1]
