"""Our proxy drives vLLM-shaped instances: a stand-in that applies vLLM's request rules (min_tokens <=
max_tokens, a prefill leg of max_tokens 1 not streamed, kv_transfer_params as vLLM's proxies send
them), answers vLLM's kv_transfer_params (unsigned, vLLM's fields) and checks that the decode leg
gets them unchanged with the same X-Request-Id."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pdlaunch.http.sse import DONE, parse_sse, sse_event
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.serving.helpers import ThreadServer, wait_for


class VllmInstance:
    """What vLLM's OpenAI server checks of a request, and how its NIXL connector answers."""

    def __init__(self, role: str, peer: VllmInstance | None = None) -> None:
        self.role, self.peer = role, peer
        self.seen: list[tuple[dict[str, Any], str]] = []
        self.answered: dict[str, dict[str, Any]] = {}  # X-Request-Id -> kv_transfer_params given out
        self.app = FastAPI()
        self.app.get("/health")(self.health)
        self.app.post("/v1/completions")(self.completions)

    async def health(self) -> Response:
        return Response(status_code=200)  # vLLM answers an empty 200

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        rid = request.headers.get("x-request-id", "")
        self.seen.append((body, rid))
        if body.get("min_tokens", 0) > body.get("max_tokens", 16):
            return JSONResponse({"error": {"message": f"min_tokens must be less than or equal to max_tokens="
                                           f"{body['max_tokens']}, got {body['min_tokens']}.",
                                           "type": "BadRequestError", "param": None, "code": 400}}, 400)
        kv = body.get("kv_transfer_params")
        if self.role == "prefill":
            if not (kv and kv.get("do_remote_decode")) or body["max_tokens"] != 1 or body.get("stream"):
                return JSONResponse({"error": {"message": "not a prefill leg", "code": 400}}, 400)
            params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [1, 2, 3],
                      "remote_engine_id": "vllm-prefill-engine", "remote_request_id": f"cmpl-{rid}-0",
                      "remote_host": "10.0.0.5", "remote_port": 5600, "tp_size": 1, "remote_num_tokens": 40,
                      "remote_blocks_expiry_time": None}
            self.answered[rid] = params
            return {"id": f"cmpl-{rid}", "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                    "kv_transfer_params": params}
        assert self.peer is not None
        if kv != self.peer.answered.get(rid):
            return JSONResponse({"error": {"message": f"unexpected kv_transfer_params {kv}", "code": 400}}, 400)
        texts = [f"t{i}" for i in range(body["max_tokens"])]
        if not body.get("stream"):
            return {"id": f"cmpl-{rid}", "choices": [{"index": 0, "text": "".join(texts), "finish_reason": "length"}]}

        async def events() -> Any:
            for text in texts:
                yield sse_event({"choices": [{"index": 0, "text": text}]})
            yield DONE

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[str, VllmInstance, VllmInstance]]:
    ports = PortAllocator("127.0.0.1")
    prefill = VllmInstance("prefill")
    decode = VllmInstance("decode", peer=prefill)
    with ThreadServer(prefill.app, ports.free("p")) as p, ThreadServer(decode.app, ports.free("d")) as d:
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d.url, "decode-0")])
        with ThreadServer(build_proxy_app(pool, 10.0), ports.free("proxy")) as proxy:  # no deployment secret
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see both")
            yield proxy.url, prefill, decode


@pytest.mark.parametrize("stream", [False, True])
def test_proxy_drives_vllm_instances_with_min_tokens(setup: Any, stream: bool) -> None:
    url, prefill, decode = setup
    body = {"model": "m", "prompt": "hello", "max_tokens": 5, "min_tokens": 3, "stream": stream}
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer sk-user"}, timeout=10)
    assert r.status_code == 200, r.text
    text = ("".join(json.loads(e)["choices"][0]["text"] for e in parse_sse(r.content) if e != "[DONE]")
            if stream else r.json()["choices"][0]["text"])
    assert text == "t0t1t2t3t4"
    leg, rid = prefill.seen[-1]
    assert "min_tokens" not in leg and leg["max_tokens"] == 1 and leg["stream"] is False
    decode_leg, decode_rid = decode.seen[-1]
    assert decode_rid == rid and decode_leg["min_tokens"] == 3 and decode_leg["max_tokens"] == 5
