"""`/v1/completions` and `/v1/chat/completions` at the proxy: prefill leg, then decode leg streamed through
(docs/ARCHITECTURE.md "Request flow").

The prefill leg asks for its sampled token in the signed answer (when the request allows it:
translate.continues_from_first_token); the decode hands that token to the client at admission and
continues from it (engine/first_token.py), so the client's first token does not wait for the KV
transfer. A token that ends the request (or max_tokens 1) ends it at the prefill's answer.

The calls to instances (deadlines, errors, relaying a stream) live in upstream.py; a leg refused by a
dead instance is retried once on another (retry.py), a prefill leg that outlives its deadline (a stalled
prefill) likewise, else the decode computes the prompt (prefill_leg.py); a decode that dies or stalls
mid-request is replaced (migrate.py). A list of prompts in /v1/completions becomes one PD request per
prompt, merged (prompt_lists.py).

Here: the two routes, one prompt or a list of them. One prompt's request, its instances and its prefill leg,
is prompt_request.py's; its decode leg decode_leg.py's.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pdlaunch.http.disconnect import CLIENT_CLOSED, DisconnectWatch
from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.limits import PARSE_INLINE_BYTES, client_request_id
from pdlaunch.http.sse import ClosingStreamingResponse
from pdlaunch.proxy.bodies import JsonObject, int_of
from pdlaunch.proxy.call import Call, suffixed
from pdlaunch.proxy.prompt_lists import MergedStream, gather_legs, merge_answers, split_prompts
from pdlaunch.proxy.prompt_request import PromptRequest
from pdlaunch.proxy.state import state_of
from pdlaunch.proxy.translate import parse_client_body, refuse_in_pd


async def completions(request: Request) -> Response:
    return await _route(request, "/v1/completions", chat=False)


async def chat_completions(request: Request) -> Response:
    return await _route(request, "/v1/chat/completions", chat=True)


async def _route(request: Request, path: str, chat: bool) -> Response:
    state = state_of(request)
    raw = await request.body()
    body = parse_client_body(raw, chat) if len(raw) <= PARSE_INLINE_BYTES else \
        await asyncio.to_thread(parse_client_body, raw, chat)  # the event loop serves every stream
    request_id = client_request_id(request.headers.get("x-request-id"), f"pd-{uuid.uuid4().hex}")
    headers = state.forwarded_headers(request, request_id)
    with DisconnectWatch(request) as watch:
        call = Call(state, path, chat, time.monotonic() + state.proxy.request_timeout_s, watch,
                    made_request_id=not request.headers.get("x-request-id"))
        if not state.pool.colocated:
            refuse_in_pd(body, chat)
        parts = None if chat or state.pool.colocated else split_prompts(body)
        if parts is None:
            return await PromptRequest(call, body, request_id, headers).serve()
        return await _serve_prompts(call, parts, body, request_id, headers)


async def _serve_prompts(call: Call, parts: list[JsonObject], body: JsonObject, request_id: str,
                         headers: dict[str, str]) -> Response:
    """A list of prompts in PD: one PD request per prompt, concurrently, merged (prompt_lists.py)."""
    n, response_id = int_of(body.get("n")) or 1, f"cmpl-{request_id}"
    ids = [suffixed(request_id, f"-{p}") for p in range(len(parts))]
    calls = [PromptRequest(call, part, ids[p], {**headers, "X-Request-Id": ids[p]}).serve()
             for p, part in enumerate(parts)]
    answers = await gather_legs(calls, _close_streams)
    if any(a.status_code == CLIENT_CLOSED for a in answers):
        await _close_streams(answers)
        return Response(status_code=CLIENT_CLOSED)
    if body.get("stream"):
        streams = [a for a in answers if isinstance(a, ClosingStreamingResponse)]
        if len(streams) != len(answers):
            await _close_streams(answers)
            raise OpenAIError(502, "an instance answered a streamed prompt without a stream",
                              code="instance_failed")
        merged = MergedStream(streams, n, response_id)
        return ClosingStreamingResponse(merged.events(), on_close=merged.close,
                                        headers={"X-Request-Id": request_id, "Cache-Control": "no-cache"})
    return JSONResponse(merge_answers([json.loads(bytes(a.body)) for a in answers], n, response_id),
                        headers={"X-Request-Id": request_id})


async def _close_streams(answers: list[Response]) -> None:
    for answer in answers:
        if isinstance(answer, ClosingStreamingResponse):
            await answer.close()
