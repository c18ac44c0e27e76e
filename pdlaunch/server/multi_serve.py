"""The HTTP side of requests with several choices (server/choices.py): readiness checks, the
response builders, the client's disconnect, and the whole or streamed answer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pdlaunch.server.choices import MultiChoice
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.errors import OpenAIError
from pdlaunch.server.limits import client_request_id
from pdlaunch.server.prompts import Prompt
from pdlaunch.server.protocol import Endpoint
from pdlaunch.server.responses import ResponseBuilder
from pdlaunch.server.sse import ClosingStreamingResponse

CLIENT_CLOSED = 499  # never seen by the client


async def serve_multi(engine_loop: EngineLoop, body: Any, prompts: list[Prompt], endpoint: Endpoint,
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
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        if not await _race(multi.start(echo), watch):
            multi.abort_all()
            return Response(status_code=CLIENT_CLOSED)
        if stream:
            async def on_close() -> None:
                multi.abort_all()

            return ClosingStreamingResponse(multi.events(include_usage), on_close=on_close,
                                            headers={**headers, "Cache-Control": "no-cache"})
        body: list[dict[str, Any]] = []

        async def respond() -> None:
            body.append(await multi.response())

        if not await _race(respond(), watch):
            multi.abort_all()
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(body[0], headers=headers)
    except BaseException:
        multi.abort_all()
        raise
    finally:
        watch.cancel()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _race(work: Any, watch: asyncio.Future[None]) -> bool:
    """Run `work` to its end (True), unless the client disconnects first (False; work cancelled)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
        return True
    task.cancel()
    return False
