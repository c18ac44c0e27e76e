"""The shared ASGI middleware (http/asgi.py base, http/auth.py, http/limits.py): HTTP requests are
checked, every other scope (lifespan) passes through untouched."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from pdlaunch.http.auth import AccessPolicy, RequireAuth
from pdlaunch.http.limits import BodyLimit


class App:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls.append(scope["type"])
        if scope["type"] == "http":
            body = (await receive()).get("body", b"")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})


def _call(middleware: Any, scope: Scope, body: bytes = b"") -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    return sent


def _http(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    return {"type": "http", "method": "POST", "path": path, "headers": headers or [], "query_string": b""}


def test_lifespan_passes_through_both_middlewares() -> None:
    app = App()
    stack = RequireAuth(BodyLimit(app, max_bytes=1), policy=AccessPolicy(api_key="key"))
    assert _call(stack, {"type": "lifespan"}) == []
    assert app.calls == ["lifespan"]


def test_auth_refuses_before_the_app_and_the_key_lets_through() -> None:
    app = App()
    stack = RequireAuth(BodyLimit(app, max_bytes=100), policy=AccessPolicy(api_key="key"))
    refused = _call(stack, _http("/v1/completions"))
    assert refused[0]["status"] == 401 and app.calls == []
    allowed = _call(stack, _http("/v1/completions", [(b"authorization", b"Bearer key")]), b"{}")
    assert allowed[0]["status"] == 200 and allowed[1]["body"] == b"{}" and app.calls == ["http"]


def test_body_limit_answers_413_without_calling_the_app() -> None:
    app = App()
    sent = _call(BodyLimit(app, max_bytes=4), _http("/v1/completions"), b"0123456789")
    assert sent[0]["status"] == 413 and app.calls == []
    assert b"security.max_request_bytes" in sent[1]["body"]


def test_a_body_announced_too_large_with_expect_100_continue_is_refused_before_it_is_sent() -> None:
    """A client that sends `Expect: 100-continue` (curl, for a body past 1 MiB) waits for the server's word before it
    sends the body; reading it (uvicorn then answers 100 Continue) had it upload all of a body already known to be past
    the limit, only to get the 413 after."""
    app = App()
    received: list[Message] = []

    async def receive() -> Message:
        message: Message = {"type": "http.request", "body": b"0123456789", "more_body": False}
        received.append(message)
        return message

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    headers = [(b"content-length", b"10"), (b"expect", b"100-continue")]
    asyncio.run(BodyLimit(app, max_bytes=4)(_http("/v1/completions", headers), receive, send))
    assert sent[0]["status"] == 413 and app.calls == []
    assert received == [], "the body was asked for: uvicorn answered 100 Continue"


def test_a_body_within_the_limit_with_expect_100_continue_is_read() -> None:
    app = App()
    headers = [(b"content-length", b"2"), (b"expect", b"100-continue")]
    sent = _call(BodyLimit(app, max_bytes=4), _http("/v1/completions", headers), b"{}")
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"{}"
