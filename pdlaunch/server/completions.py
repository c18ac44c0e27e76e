"""`POST /v1/completions` and `POST /v1/chat/completions`: one path for both and for any number of choices.

The handler validates the body (a chat's template messages built and counted with it: in a worker thread for a
large body, http/limits.py:read_prepared) and hands it to `serve`, which starts its choices (server/choices.py: one
engine request per choice, a plain request being one) and answers with the whole response or an SSE
stream. Handlers never touch the engine directly: requests go through the EngineLoop (engine thread)
and their outputs come back on per-request asyncio queues, so the event loop never blocks on a step.

The choices are prepared (their sampling fields checked, a response builder each) on the event loop when that is
quick: no structured-output grammar to compile, a body small enough to have been validated there (http/limits.py)
and at most INLINE_CHOICES engine requests; else in a worker thread. Each hand-over to a worker thread and back
cost a request ~0.3 ms on an idle 2-core CPU and several ms on a busy one before it reached the engine.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from functools import partial

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pdlaunch.http import JsonObject
from pdlaunch.http.disconnect import CLIENT_CLOSED, ClientDisconnected, DisconnectWatch
from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.limits import PARSE_INLINE_BYTES, client_request_id, read_model, read_prepared
from pdlaunch.http.sse import ClosingStreamingResponse
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.chat_template import ChatPrompt
from pdlaunch.server.choices import Choices, engine_request_id, release_unsubmitted
from pdlaunch.server.completion_request import CompletionRequest
from pdlaunch.server.instance import Handler, Instance, instance_of
from pdlaunch.server.prompts import Prompt

INLINE_CHOICES = 16  # engine requests (prompts x samples) a request may start to be prepared on the event loop


async def completions(request: Request) -> Response:
    instance = instance_of(request)
    body = await read_model(request, CompletionRequest)
    instance.check_model(body.model)
    return await serve(instance, body, body.prompts(), request)


async def chat_completions(request: Request) -> Response:
    instance = instance_of(request)
    body, prompt = await read_prepared(request, partial(_prepared_chat, instance))
    return await serve(instance, body, [prompt], request)


def _prepared_chat(instance: Instance, data: JsonObject) -> tuple[ChatCompletionRequest, ChatPrompt]:
    """The chat body validated, its model checked, its template messages built and their characters counted (the
    size check on the event loop reads that count): in a worker thread for a large body (read_prepared), where
    200,000 messages cannot hold every other stream of the instance."""
    body = ChatCompletionRequest.model_validate(data)
    instance.check_model(body.model)
    prompt = body.template_messages()
    prompt.num_chars()
    return body, prompt


async def serve(instance: Instance, body: CompletionRequest | ChatCompletionRequest, prompts: Sequence[Prompt],
                request: Request) -> Response:
    """Start the request's choices and answer. A failure, or the client leaving before the answer,
    aborts them all. The client's X-Request-Id names the response; each engine request id adds a
    suffix, so that a reused header (or a prefill id still holding KV for its decode leg) never
    collides inside the engine."""
    instance.check_serving()
    client_id = client_request_id(request.headers.get("x-request-id"), uuid.uuid4().hex)
    # Off the event loop unless quick (module doc): the sampling fields' check compiles a structured-output grammar,
    # which takes seconds for a long guided_choice list, and every other request's stream would wait on it.
    prepare = partial(Choices, instance.engine_loop, body, prompts, client_id, instance.model_name)
    try:
        choices = prepare() if _quick(body, prompts, len(await request.body())) else await asyncio.to_thread(prepare)
    except OpenAIError as exc:
        if _refuses_the_request(exc):  # e.g. a decode leg's n or min_tokens, which its prefill leg did not carry
            release_unsubmitted(instance.engine_loop, engine_request_id(client_id), body.kv_transfer_params, prompts,
                                [])
        raise
    headers = {"X-Request-Id": client_id}
    try:
        with DisconnectWatch(request) as watch:
            await watch.run(choices.start())
            if body.stream:
                async def on_close() -> None:  # no-op once finished; frees the blocks if the client left
                    choices.abort_all()

                return ClosingStreamingResponse(choices.events(body.include_usage()), on_close=on_close,
                                                headers={**headers, "Cache-Control": "no-cache"})
            result = await watch.run(choices.response())
            if watch.gone:
                raise ClientDisconnected
            return JSONResponse(result, headers=headers)
    except ClientDisconnected:
        choices.client_gone()
        return Response(status_code=CLIENT_CLOSED)
    except OpenAIError as exc:
        choices.abort_all()
        if _refuses_the_request(exc):  # maybe before its decode leg was submitted
            choices.release_unsubmitted()
        raise
    except BaseException:
        choices.abort_all()
        raise


def _refuses_the_request(error: OpenAIError) -> bool:
    """Whether `error` refuses the request itself (a 4xx), so that a PD decode leg it ends releases its prefill's hold.
    Not a 409 (its X-Request-Id is in flight here, maybe with the same params) nor a 503 (this instance's state: a
    proxy may send the same leg to another decode), as the engine's add_request."""
    return 400 <= error.status < 500 and error.status != 409


def _quick(body: CompletionRequest | ChatCompletionRequest, prompts: Sequence[Prompt], body_bytes: int) -> bool:
    """Whether the request's choices are prepared on the event loop (module doc)."""
    samples = body.best_of if isinstance(body, CompletionRequest) and body.best_of is not None else body.n
    return body_bytes <= PARSE_INLINE_BYTES and not body.asks_for_grammar() and len(prompts) * samples <= INLINE_CHOICES


ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/v1/completions", completions), ("POST", "/v1/chat/completions", chat_completions)]
