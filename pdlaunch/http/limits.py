"""Bounds on what a client may send, checked before anything else looks at it.

- Body size: `BodyLimit` reads the body itself, counting bytes as they arrive (a Content-Length is
  a claim, not a bound), and answers 413 past `security.max_request_bytes`, before any parsing, and 408
  when the body stops arriving for BODY_IDLE_SECONDS.
- JSON shape: `parse_json_object` refuses, with a 400 naming the field, what Python's json accepts
  but nothing downstream can handle: NaN/Infinity (and 1e999, which parses as inf), nesting deeper
  than MAX_JSON_DEPTH (1,000 levels raise RecursionError), lone UTF-16 surrogates ("a\\ud800b"
  cannot be encoded, so a tokenizer fails on it) and integers of more than 4,300 digits.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdlaunch.errors import json_kind
from pdlaunch.http import JsonObject
from pdlaunch.http.asgi import HTTPMiddleware
from pdlaunch.http.errors import OpenAIError

ModelT = TypeVar("ModelT", bound=BaseModel)
PreparedT = TypeVar("PreparedT")

MAX_JSON_DEPTH = 64  # OpenAI bodies nest 4-5 levels (messages -> content parts -> ...)
# Past the limit the rest of the body is read and dropped (up to this much, this long) so that the
# client, still sending, receives the 413 instead of a reset connection.
DRAIN_BYTES = 64 << 20
DRAIN_SECONDS = 5.0
# A body that stops arriving for this long is answered 408 (uvicorn bounds the wait between requests, not inside
# one): a client that sent its headers and part of its body held its connection and this task forever.
BODY_IDLE_SECONDS = 30.0
PARSE_INLINE_BYTES = 64 << 10


class _NonFinite:
    def __init__(self, literal: str) -> None:
        self.literal = literal


_EMPTY_BODY_ADVICE = ": send a JSON object (Content-Type: application/json)"


def parse_json_object(raw: bytes) -> JsonObject:
    """A request body as a JSON object whose every value is finite, shallow and encodable."""
    if not raw or raw.isspace():  # `curl -X POST URL` without -d: json's words were "Expecting value: line 1 column 1"
        raise OpenAIError(400, "request body is empty" + _EMPTY_BODY_ADVICE, param="body")
    try:
        body = json.loads(raw, parse_constant=_NonFinite)
    except RecursionError:
        raise OpenAIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels", param="body") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, over-long integers, bad UTF-8
        raise OpenAIError(400, _not_json(exc), param="body") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, f"request body must be a JSON object, got {json_kind(body)}", param="body")
    check_json_values(body)
    return body


# Python's words for an integer past sys.get_int_max_str_digits(), which end in advice to its own programmer.
_LONG_INTEGER = re.compile(r"Exceeds the limit \((\d+) digits\) for integer string conversion: value has (\d+) digits")


def _not_json(exc: ValueError) -> str:
    """What json.loads refused, in words for the client: an over-long integer's count of digits, not Python's advice
    to call sys.set_int_max_str_digits() (the server's setting, which the client cannot change)."""
    long_integer = _LONG_INTEGER.match(str(exc))
    if long_integer is not None:
        limit, digits = long_integer.groups()
        return (f"request body holds an integer of {digits} digits; a number here has at most {limit} digits: send a "
                "smaller one")
    return f"request body is not valid JSON: {exc}"


def body_problem(error: OpenAIError) -> str:
    """What parse_json_object found wrong with a body ("body is empty", "body is not valid JSON: ..."), without the
    advice to a client that sent it: for a body another process answered with (the proxy's instances)."""
    return error.message.removeprefix("request ").removesuffix(_EMPTY_BODY_ADVICE)


def _prepared(raw: bytes, prepare: Callable[[JsonObject], PreparedT]) -> PreparedT:
    return prepare(parse_json_object(raw))


async def read_prepared(request: Request, prepare: Callable[[JsonObject], PreparedT]) -> PreparedT:
    """`prepare` of the request's body parsed (parse_json_object): its validation and whatever else grows with the
    body (a chat's template messages, their size check). A large body in a worker thread, every step: validating
    and templating a request of many megabytes holds the event loop, every other request's stream and /health
    with it, as long as parsing it does; a small one on the loop, where a worker thread's hand-over costs more."""
    raw = await request.body()
    if len(raw) <= PARSE_INLINE_BYTES:
        return _prepared(raw, prepare)
    return await asyncio.to_thread(_prepared, raw, prepare)


async def read_model(request: Request, model: type[ModelT]) -> ModelT:
    """The request's body parsed (parse_json_object) and validated as `model` (read_prepared)."""
    return await read_prepared(request, model.model_validate)


def check_json_values(body: JsonObject) -> None:
    """400 naming the first field (dotted path) that holds a non-finite number, a lone surrogate,
    or nests deeper than MAX_JSON_DEPTH. Iterative, so depth cannot overflow the stack here."""
    stack: list[tuple[object, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        field = path or "body"
        if depth > MAX_JSON_DEPTH:
            raise OpenAIError(400, f"{field}: nests deeper than {MAX_JSON_DEPTH} levels", param=field)
        if isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                _check_text(key, child)
                stack.append((item, child, depth + 1))
        elif isinstance(value, list):
            if all(type(item) is int for item in value):  # token ids: nothing to check, and there may be millions
                continue
            stack.extend((item, f"{path}.{i}", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, field)
        elif isinstance(value, _NonFinite) or (isinstance(value, float) and not math.isfinite(value)):
            literal = value.literal if isinstance(value, _NonFinite) else repr(value)
            raise OpenAIError(400, f"{field}: {literal} is not a finite number", param=field)


def _check_text(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OpenAIError(400, f"{field}: holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair); "
                               "send valid Unicode", param=field) from None


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"request body exceeds {limit} bytes (security.max_request_bytes)",
                       param="body", code="request_too_large")


def _body_stalled(received: int, declared: int | None) -> OpenAIError:
    of = f" of the {declared} its Content-Length announced" if declared is not None else ""
    return OpenAIError(408, f"the request body stopped arriving: {received} bytes{of} came, then nothing for "
                            f"{BODY_IDLE_SECONDS:g} s; send the whole body", param="body", code="request_timeout")


class BodyLimit(HTTPMiddleware):
    """ASGI middleware: buffer the body up to `max_bytes`, then hand it to the app; 413 beyond."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _content_length(scope)
        # Too much to drain; or a client that waits for 100 Continue (sent once the body is read) before it sends a
        # body already known to be too large: it reads the 413 instead, and sends nothing.
        if declared is not None and (declared > self.max_bytes + DRAIN_BYTES
                                     or (declared > self.max_bytes and _expects_continue(scope))):
            await _too_large(self.max_bytes).response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), BODY_IDLE_SECONDS)
            except asyncio.TimeoutError:
                await _body_stalled(size, _content_length(scope)).response()(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _drain(receive, size, message.get("more_body", False))
                await _too_large(self.max_bytes).response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls: the disconnect watch of streaming handlers

        await self.app(scope, replay, send)


async def _drain(receive: Receive, size: int, more: bool) -> None:
    deadline = time.monotonic() + DRAIN_SECONDS
    drained = 0
    while more and drained < DRAIN_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), remaining)
        except asyncio.TimeoutError:
            return
        if message["type"] == "http.disconnect":
            return
        drained += len(message.get("body", b""))
        more = message.get("more_body", False)


def _expects_continue(scope: Scope) -> bool:
    return any(key.lower() == b"expect" and value.strip().lower() == b"100-continue"
               for key, value in scope.get("headers", []))


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


MAX_REQUEST_ID_CHARS = 256  # the engine id adds a suffix; kv_transfer_params ids hold at most 512


def client_request_id(value: str | None, default: str) -> str:
    """The client's X-Request-Id (it names the response and both PD legs), or `default` when absent."""
    if not value:
        return default
    if len(value) > MAX_REQUEST_ID_CHARS or not value.isprintable() or not value.isascii():
        raise OpenAIError(400, f"X-Request-Id must be at most {MAX_REQUEST_ID_CHARS} printable ASCII characters",
                          param="X-Request-Id")
    return value
