"""A minimal OpenAI-compatible streaming server for bench tests, run by uvicorn in a thread.

Streams one chunk per token (`max_tokens` of them) then a usage chunk, as vLLM does with
stream_options.include_usage; answers /v1/completions and /v1/chat/completions. With
`fail_every=k`, every k-th request (in arrival order) gets HTTP 500. With `max_model_len`, /v1/models lists it for
the model, as pdlaunch's and vLLM's servers do. With `api_key`, every route answers 401 without
`Authorization: Bearer <api_key>`, checked by pdlaunch's own AccessPolicy (a key beyond ASCII as UTF-8 or latin-1), as
`pdlaunch serve --api-key` does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pdlaunch.http.auth import AccessPolicy
from tests.helpers.ports import free_port

MODEL = "fake-model"


def make_app(seen: list[dict[str, Any]], fail_every: int = 0, max_model_len: int | None = None,
             api_key: str | None = None) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def authorize(request: Request, call_next: Any) -> Any:
        refused = AccessPolicy(api_key=api_key).check(request.url.path, request.headers.get("authorization"), None)
        if api_key is not None and refused is not None:
            return JSONResponse({"error": {"message": "invalid API key", "code": "invalid_api_key"}}, status_code=401)
        return await call_next(request)
    counter = itertools.count(1)
    listed: dict[str, Any] = {"id": MODEL, "object": "model"}
    if max_model_len is not None:
        listed["max_model_len"] = max_model_len

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [listed]}

    async def answer(request: Request, chat: bool) -> Any:
        body = await request.json()
        seen.append(body)
        if fail_every and next(counter) % fail_every == 0:
            return JSONResponse({"error": {"message": "planted failure"}}, status_code=500)
        n = int(body["max_tokens"])
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())

        async def stream() -> AsyncIterator[str]:
            for i in range(n):
                await asyncio.sleep(0.001)
                choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
                yield f"data: {json.dumps({'id': 'cmpl-1', 'model': MODEL, 'choices': [choice]})}\n\n"
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
            yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await answer(request, chat=True)

    return app


@contextmanager
def fake_server(fail_every: int = 0, timeout_s: float = 20.0, max_model_len: int | None = None,
                api_key: str | None = None) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Yields (base_url, request bodies seen); stops the server and joins its thread on exit."""
    seen: list[dict[str, Any]] = []
    port = free_port()
    config = uvicorn.Config(make_app(seen, fail_every, max_model_len, api_key), host="127.0.0.1", port=port,
                            log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"fake OpenAI server on port {port} did not start within {timeout_s}s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.should_exit = True
        thread.join(timeout_s)
