"""ShutdownAnswer (http/shutdown_answer.py), the proxy's and every instance's: what runs when `stopping` is set, and
what arrives after, gets 503 shutting_down with Retry-After; a streamed body (an instance's: cut_streams) ends whole;
a cancellation that is not its own (the client gone, uvicorn's deadline) goes on as it was. Each request runs in a
task of its own, as uvicorn runs it."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.types import Message, Receive, Scope, Send

from pdlaunch.http.shutdown_answer import ShutdownAnswer
from pdlaunch.http.sse import DONE

TIMEOUT_S = 10.0
SCOPE: Scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}


class App:
    """Answers after `release` is set: headers `head` at once where given (a stream), its body then."""

    def __init__(self, head: list[tuple[bytes, bytes]] | None = None) -> None:
        self.head = head
        self.release = asyncio.Event()
        self.cancelled = False
        self.called = False
        self.waiting = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.called = True
        if self.head is not None:
            await send({"type": "http.response.start", "status": 200, "headers": self.head})
            await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        self.waiting = True
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.head is None:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def _start(middleware: ShutdownAnswer) -> tuple[asyncio.Task[None], list[Message]]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    return asyncio.ensure_future(middleware(dict(SCOPE), _receive, send)), sent


def _error(sent: list[Message]) -> tuple[int, dict[bytes, bytes], dict[str, object]]:
    head = sent[0]
    return head["status"], dict(head["headers"]), json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


async def _until(app: App) -> None:
    """Until `app` waits for its release (its head sent where it streams)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while not app.waiting:
        assert asyncio.get_running_loop().time() < deadline, f"the app to run within {TIMEOUT_S}s"
        await asyncio.sleep(0)


async def _turns() -> None:
    """A few turns of the loop: a cut that `stopping` starts has ended by then (watch, callback, cancel)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_request_running_or_arriving_once_stopping_is_set_gets_503_shutting_down() -> None:
    async def run() -> None:
        stopping = asyncio.Event()
        app = App()
        middleware = ShutdownAnswer(app, stopping)
        running, sent = _start(middleware)
        await _until(app)
        stopping.set()
        await asyncio.wait_for(running, TIMEOUT_S)
        status, headers, body = _error(sent)
        assert app.cancelled and status == 503 and headers[b"retry-after"] == b"1", sent
        assert body["error"]["code"] == "shutting_down", body  # type: ignore[index]
        later_app = App()
        later, later_sent = _start(ShutdownAnswer(later_app, stopping))
        await asyncio.wait_for(later, TIMEOUT_S)
        assert not later_app.called and _error(later_sent)[0] == 503, later_sent

    asyncio.run(run())


def test_a_cancellation_not_its_own_goes_on() -> None:
    """The client gone or uvicorn's deadline: the request's task ends cancelled, no answer is made up."""
    async def run() -> None:
        app = App()
        running, sent = _start(ShutdownAnswer(app, asyncio.Event()))
        await _until(app)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(running, TIMEOUT_S)
        assert app.cancelled and sent == []

    asyncio.run(run())


@pytest.mark.parametrize(("media", "end"), [
    (b"text/event-stream", "event"),  # the proxy's too: it continues the stream elsewhere where it can (migrate.py)
    (b"application/x-ndjson", "whole"),
])
def test_a_stream_is_cut_whole_where_cut_streams(media: bytes, end: str) -> None:
    async def run() -> None:
        stopping = asyncio.Event()
        app = App(head=[(b"content-type", media)])
        running, sent = _start(ShutdownAnswer(app, stopping, cut_streams=True))
        await _until(app)
        stopping.set()
        await asyncio.wait_for(running, TIMEOUT_S)
        assert app.cancelled and sent[-1]["more_body"] is False, sent
        last = sent[-1]["body"]
        if end == "whole":
            assert last == b"", last
        else:
            assert last.endswith(DONE), last
            assert json.loads(last[len(b"data: "):-len(DONE)])["error"]["code"] == "shutting_down", last

    asyncio.run(run())


@pytest.mark.parametrize(("cut_streams", "head"), [
    (False, [(b"content-type", b"text/event-stream")]),  # the proxy's streams end with their own event
    (True, [(b"content-type", b"application/json"), (b"content-length", b"12")]),  # a whole body being sent
])
def test_a_started_answer_that_is_no_stream_to_cut_runs_on(cut_streams: bool, head: list[tuple[bytes, bytes]]) -> None:
    async def run() -> None:
        stopping = asyncio.Event()
        app = App(head=head)
        running, sent = _start(ShutdownAnswer(app, stopping, cut_streams=cut_streams))
        await _until(app)
        stopping.set()
        await _turns()
        assert not running.done() and not app.cancelled
        app.release.set()
        await asyncio.wait_for(running, TIMEOUT_S)
        assert sent[-1] == {"type": "http.response.body", "body": b"{}", "more_body": False}, sent

    asyncio.run(run())
