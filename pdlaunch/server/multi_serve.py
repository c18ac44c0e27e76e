"""The HTTP side of requests with several choices (server/choices.py): readiness checks, the
response builders, the client's disconnect, and the whole or streamed answer."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pdlaunch.http.disconnect import CLIENT_CLOSED, ClientDisconnected, DisconnectWatch
from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.limits import client_request_id
from pdlaunch.http.sse import ClosingStreamingResponse
from pdlaunch.server.choices import MultiChoice
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.prompts import Prompt
from pdlaunch.server.protocol import Endpoint
from pdlaunch.server.responses import ResponseBuilder


async def serve_multi(engine_loop: EngineLoop, body: Any, prompts: Sequence[Prompt], endpoint: Endpoint,
                      request: Request, model_name: str, sleeping: bool) -> Response:
    """The instance's answer to a request with several choices (app.py hands them here)."""
    if sleeping:
        raise OpenAIError(503, "instance is sleeping; POST /wake_up first", code="sleeping")
    if engine_loop.state != "ready":
        raise OpenAIError(503, f"engine is not ready (state: {engine_loop.state})", code="not_ready")
    params = body.sampling_params()
    client_id = client_request_id(request.headers.get("x-request-id"), uuid.uuid4().hex)
    calling = body.tool_calling() if endpoint == "chat" else None
    tokenizer = engine_loop.engine.tokenizer

    def make_builder() -> ResponseBuilder:
        return ResponseBuilder(endpoint=endpoint, model=model_name, return_token_ids=body.return_token_ids,
                               tool_calling=calling, detokenize=lambda token_id: tokenizer.decode([token_id]),
                               response_id=("cmpl-" if endpoint == "completion" else "chatcmpl-") + client_id)

    def echo_text(prompt_index: int, ids: list[int]) -> str:
        prompt = prompts[prompt_index]
        return prompt if isinstance(prompt, str) else tokenizer.decode(ids)

    n = body.n
    best_of = getattr(body, "best_of", None) or n
    multi = MultiChoice(engine_loop, prompts, params, n, best_of, make_builder, client_id, body.kv_transfer_params)
    return await serve_choices(multi, request, body.stream, body.include_usage(), {"X-Request-Id": client_id},
                               echo_text if getattr(body, "echo", False) else None)


async def serve_choices(multi: MultiChoice, request: Request, stream: bool, include_usage: bool,
                        headers: dict[str, str], echo: Callable[[int, list[int]], str] | None) -> Response:
    """Start the choices and answer: a whole response or an SSE stream. A failure, or the client
    leaving before the answer, aborts them all."""
    try:
        with DisconnectWatch(request) as watch:
            await watch.run(multi.start(echo))
            if stream:
                async def on_close() -> None:
                    multi.abort_all()

                return ClosingStreamingResponse(multi.events(include_usage), on_close=on_close,
                                                headers={**headers, "Cache-Control": "no-cache"})
            return JSONResponse(await watch.run(multi.response()), headers=headers)
    except ClientDisconnected:
        multi.abort_all()
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        multi.abort_all()
        raise
