"""OpenAI-format errors: `{"error": {"message", "type", "param", "code"}}` with a matching HTTP status.

Used by the instance server and the proxy, so a client sees the same shape whichever answered. `code` is a
string naming the condition where we have one (OpenAI's: `invalid_api_key`, `model_not_found`; ours:
`shutting_down`, `overloaded`, ...), else the HTTP status as a number, as vLLM's ErrorInfo.code (an int) has it.
`type` is OpenAI's name for the status (vLLM writes its exception's: `BadRequestError`, `NotFoundError`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdlaunch.errors import error_text

# HTTP status -> OpenAI error type (OpenAI's names).
_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",  # OpenAI answers a bad key with this type and code "invalid_api_key"
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "internal_server_error",
    502: "bad_gateway_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class OpenAIError(Exception):
    """A request failure to answer in the OpenAI error format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The error answer's body; without a named `code`, vLLM's: the status."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or status}}


def param_of(loc: Sequence[object]) -> str:
    """Dotted parameter path from a pydantic error location, without the `body` prefix."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


# Where FastAPI found a parameter, the first item of a RequestValidationError's location: not part of the name the
# client sent (`query.level` is the query parameter `level`).
_SOURCES = ("body", "query", "path", "header", "cookie")


def validation_error(exc: ValidationError | RequestValidationError) -> OpenAIError:
    """The first problem of a pydantic error as a 400 naming the parameter as the client sent it."""
    errors = exc.errors()
    if not errors:
        return OpenAIError(400, "invalid request body")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if isinstance(exc, RequestValidationError) and len(loc) > 1 and loc[0] in _SOURCES:
        loc = loc[1:]
    param = param_of(loc)
    message = f"{param}: {error_text(first)}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return OpenAIError(400, message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app raises leaves in the OpenAI format (never FastAPI's `detail` shape)."""

    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(ValidationError)
    async def _invalid_model(_: Request, exc: ValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Its headers too: a 405 names the methods the path takes in Allow (RFC 9110 requires it).
        response = OpenAIError(exc.status_code, _http_message(request, exc)).response()
        response.headers.update(exc.headers or {})
        return response


def _http_message(request: Request, exc: StarletteHTTPException) -> str:
    """Starlette's words for a request no route takes ("Method Not Allowed", "Not Found") with what was sent and
    what the server takes instead: the methods of the path (its Allow header), or the paths it has."""
    sent = f"{request.method} {request.url.path}"
    allow = (exc.headers or {}).get("Allow")
    if exc.status_code == 405 and allow:
        takes = sorted(allow.split(", "), key=lambda m: (_METHODS.index(m) if m in _METHODS else len(_METHODS), m))
        return f"{sent}: {request.url.path} takes {' or '.join(takes)}, not {request.method}"
    if exc.status_code == 404 and exc.detail == "Not Found":
        paths = [getattr(route, "path", "") for route in request.app.routes]
        paths = list(dict.fromkeys(p for p in paths if p and not p.startswith(_UNLISTED)))  # GET and HEAD: one path
        return f"{sent}: no such route on this server (it has {', '.join(paths)})"
    return str(exc.detail)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")  # the order a 405's message names them in
# Paths a 404 does not list: FastAPI's own documentation routes, and the deployment's internal ones.
_UNLISTED = ("/docs", "/redoc", "/openapi.json", "/internal/")
