"""A minimal OpenAI-compatible streaming server for bench tests, run by uvicorn in a thread.

Streams `max_tokens` completion chunks then a usage chunk, like vLLM with
stream_options.include_usage. A request whose first prompt id is FAIL_TOKEN gets HTTP 500.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

FAIL_TOKEN = 7
MODEL = "fake-model"


def make_app(seen: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        seen.append(body)
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and prompt[0] == FAIL_TOKEN:
            return JSONResponse({"error": {"message": "planted failure"}}, status_code=500)
        n = int(body["max_tokens"])
        n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())

        async def stream() -> AsyncIterator[str]:
            for i in range(n):
                await asyncio.sleep(0.001)
                chunk = {"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                         "choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
            yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def fake_server(timeout_s: float = 20.0) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Yields (base_url, request bodies seen); stops the server and joins its thread on exit."""
    seen: list[dict[str, Any]] = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(seen), host="127.0.0.1", port=port, log_level="warning"))
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
