"""Stand-ins for vLLM's NIXL test proxies, written from their request flow field for field (they cannot be
fetched at test time): tests/v1/kv_connector/nixl_integration/toy_proxy_server.py (pull) and
toy_push_proxy_server.py (push) of vllm-project/vllm. What they do that our instances must accept:

- both: one `str(uuid4())` as X-Request-Id of both legs; `Authorization: Bearer {OPENAI_API_KEY}`
  ("Bearer None" when unset); base URL http://HOST:PORT/v1; round robin over each role.
- prefill leg: the client's body with kv_transfer_params = {do_remote_decode: true, do_remote_prefill:
  false, remote_engine_id/remote_block_ids/remote_host/remote_port: null}, stream false, max_tokens 1
  (max_completion_tokens 1 if given), stream_options and min_tokens / min_completion_tokens removed.
- pull decode leg: the client's body with the prefill's kv_transfer_params unchanged.
- push decode leg: kv_transfer_params rebuilt from the prefill's answer with only do_remote_prefill
  true, do_remote_decode false, remote_engine_id, remote_request_id, remote_host, remote_port,
  tp_size: no remote_block_ids (and so none of our signature).
- the decode's bytes are streamed back as they come (media type application/json, even for SSE).
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

PUSH_FIELDS = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port", "tp_size")


def vllm_proxy_app(mode: Literal["pull", "push"], prefill_urls: list[str], decode_urls: list[str]) -> FastAPI:
    prefills, decodes = itertools.cycle(prefill_urls), itertools.cycle(decode_urls)
    app = FastAPI()

    def headers(request_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY')}", "X-Request-Id": request_id}

    async def handle(api: str, request: Request) -> StreamingResponse:
        req_data: dict[str, Any] = await request.json()
        request_id = str(uuid.uuid4())
        leg = dict(req_data)
        leg["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                     "remote_block_ids": None, "remote_host": None, "remote_port": None}
        leg["stream"] = False
        leg["max_tokens"] = 1
        if "max_completion_tokens" in leg:
            leg["max_completion_tokens"] = 1
        leg.pop("stream_options", None)
        leg.pop("min_tokens", None)
        leg.pop("min_completion_tokens", None)
        async with httpx.AsyncClient(base_url=f"{next(prefills)}/v1", timeout=None) as client:
            response = await client.post(api, json=leg, headers=headers(request_id))
            response.raise_for_status()
            kv_transfer_params = response.json().get("kv_transfer_params", {})
        if kv_transfer_params and mode == "pull":
            req_data["kv_transfer_params"] = kv_transfer_params
        elif kv_transfer_params:
            req_data["kv_transfer_params"] = {"do_remote_prefill": True, "do_remote_decode": False,
                                              **{k: kv_transfer_params.get(k) for k in PUSH_FIELDS}}
        decode = next(decodes)

        async def generate() -> AsyncIterator[bytes]:
            async with httpx.AsyncClient(base_url=f"{decode}/v1", timeout=None) as client:
                async with client.stream("POST", api, json=req_data, headers=headers(request_id)) as response:
                    response.raise_for_status()
                    async for chunk in response.aiter_bytes():
                        yield chunk

        return StreamingResponse(generate(), media_type="application/json")

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        return await handle("/completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        return await handle("/chat/completions", request)

    @app.get("/healthcheck")
    async def healthcheck() -> dict[str, Any]:
        return {"status": "ok", "prefill_instances": len(prefill_urls), "decode_instances": len(decode_urls)}

    return app
