"""A large request body is parsed and validated in a worker thread (http/limits.py `read_model`): validating the
request model of a 16 MB body held the event loop ~0.4 s, and every other request's stream with it; a small one is
validated inline (a thread hop costs more than it does)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from pydantic import BaseModel
from starlette.requests import Request

from pdlaunch.http import limits
from pdlaunch.http.limits import read_model

SEEN_ON: list[str] = []  # the threads validation ran on


class _Body(BaseModel):
    prompt: Any

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> _Body:  # type: ignore[override]
        SEEN_ON.append(threading.current_thread().name)
        return super().model_validate(obj, *args, **kwargs)


def _request(body: bytes) -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": "POST", "headers": [], "path": "/"}, receive)


@pytest.mark.parametrize(("size", "inline"), [(100, True), (limits.PARSE_INLINE_BYTES + 1, False)])
def test_large_bodies_are_validated_off_the_event_loop(size: int, inline: bool) -> None:
    SEEN_ON.clear()
    body = json.dumps({"prompt": "x" * size}).encode()

    async def run() -> tuple[_Body, str]:
        return await read_model(_request(body), _Body), threading.current_thread().name

    parsed, loop_thread = asyncio.run(run())
    assert parsed.prompt == "x" * size
    assert (SEEN_ON == [loop_thread]) == inline, SEEN_ON
