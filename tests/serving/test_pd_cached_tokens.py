"""usage.prompt_tokens_details.cached_tokens through PD is the prefill's count: the prompt tokens its prefix cache
held, so that it did not compute them (what a user means, and vLLM's count). The proxy answered with the decode's
own count, which says how much of the KV the decode held rather than loaded: 0 for a prompt whose every block the
prefill had cached, or blocks the prefill computed again. Whole answers and streams (the usage on the last chunk or in
the usage chunk), through a real proxy in front of scripted instances over HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import JsonValue

from pdlaunch.http.sse import DONE, parse_sse, sse_event
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.server.responses import PROMPT_RECOMPUTED
from tests.serving.helpers import ThreadServer, wait_for

PROMPT_TOKENS = 24
DECODE_CACHED = 8  # the decode held one block of the prompt already


def _usage(cached: JsonValue) -> dict[str, JsonValue]:
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2, "total_tokens": PROMPT_TOKENS + 2,
            "prompt_tokens_details": {"cached_tokens": cached}}


class Prefill:
    def __init__(self) -> None:
        self.cached: JsonValue = 16
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.post("/v1/completions")(self.completions)
        self.app.post("/v1/chat/completions")(self.completions)

    async def completions(self) -> Any:
        answer: dict[str, JsonValue] = {
            "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
            "kv_transfer_params": {"do_remote_prefill": True, "remote_request_id": "r"}}
        if self.cached != "absent":
            answer["usage"] = _usage(self.cached)
        return answer


class Decode:
    def __init__(self) -> None:
        self.recomputed = False  # its KV load failed: it computed the prompt itself, and its answer says so
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.post("/v1/completions")(self.completions)
        self.app.post("/v1/chat/completions")(self.completions)

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        if not body.get("stream"):
            return self._marked({"id": "cmpl-1", "object": "text_completion", "model": "tiny",
                                 "usage": _usage(DECODE_CACHED),
                                 "choices": [{"index": 0, "text": "ab", "finish_reason": "length"}]})
        separate = (body.get("stream_options") or {}).get("include_usage")

        async def events() -> AsyncIterator[bytes]:
            head = {"id": "cmpl-1", "object": "text_completion", "model": "tiny"}
            yield sse_event({**head, "choices": [{"index": 0, "text": "a \"usage\": {}", "finish_reason": None}]})
            last: dict[str, JsonValue] = {**head, "choices": [{"index": 0, "text": "b", "finish_reason": "length"}]}
            yield sse_event(last if separate else self._marked({**last, "usage": _usage(DECODE_CACHED)}))
            if separate:
                yield sse_event(self._marked({**head, "choices": [], "usage": _usage(DECODE_CACHED)}))
            yield DONE

        return StreamingResponse(events(), media_type="text/event-stream")

    def _marked(self, answer: dict[str, JsonValue]) -> dict[str, JsonValue]:
        """What carries the usage says whether the prompt was computed here (server/responses.PROMPT_RECOMPUTED)."""
        return {**answer, "kv_transfer_params": {PROMPT_RECOMPUTED: True}} if self.recomputed else answer


@pytest.fixture(scope="module")
def deployment() -> Iterator[tuple[str, Prefill, Decode]]:
    ports = PortAllocator("127.0.0.1")
    prefill, decode = Prefill(), Decode()
    with ThreadServer(prefill.app, ports.free("prefill")) as p, ThreadServer(decode.app, ports.free("decode")) as d:
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d.url, "decode-0")])
        with ThreadServer(build_proxy_app(pool, 60.0), ports.free("proxy")) as proxy:
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see both")
            yield proxy.url, prefill, decode


def _usage_of(url: str, path: str, **body: JsonValue) -> dict[str, Any]:
    """The usage the client got (nothing it got carries kv_transfer_params)."""
    request = {"model": "tiny", "max_tokens": 2, **body,
               **({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})}
    answer = httpx.post(f"{url}{path}", json=request, timeout=30)
    assert answer.status_code == 200, answer.text
    if not body.get("stream"):
        assert "kv_transfer_params" not in answer.json()
        usage: dict[str, Any] = answer.json()["usage"]
        return usage
    events = parse_sse(answer.content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "a \"usage\": {}b"  # the text as it came
    assert not any("kv_transfer_params" in c for c in chunks)
    [carried] = [c["usage"] for c in chunks if c.get("usage")]
    return carried


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [None, {}, {"include_usage": True}], ids=["whole", "stream", "usage-chunk"])
def test_cached_tokens_are_the_prefill_s(deployment: tuple[str, Prefill, Decode], path: str,
                                         stream: dict[str, bool] | None) -> None:
    url, prefill, _ = deployment
    prefill.cached = 16
    body: dict[str, JsonValue] = {} if stream is None else {"stream": True, "stream_options": stream or None}
    usage = _usage_of(url, path, **body)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 16}, usage
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (PROMPT_TOKENS, 2)


@pytest.mark.parametrize("cached", [PROMPT_TOKENS + 1, -1, "16", 1.5, None, "absent"])
def test_a_prefill_count_that_is_none_leaves_the_decode_s(deployment: tuple[str, Prefill, Decode],
                                                          cached: JsonValue) -> None:
    """A count past the prompt, not a non-negative integer, or not given at all (an instance without usage
    details) is not the prompt's: the decode's answer stands as it came."""
    url, prefill, _ = deployment
    prefill.cached = cached
    for body in ({}, {"stream": True}):
        assert _usage_of(url, "/v1/completions", **body)["prompt_tokens_details"] == {"cached_tokens": DECODE_CACHED}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [None, {}, {"include_usage": True}], ids=["whole", "stream", "usage-chunk"])
@pytest.mark.parametrize("prefill_cached", [16, "absent"])
def test_a_decode_that_computed_the_prompt_itself_keeps_its_count(
        deployment: tuple[str, Prefill, Decode], path: str, stream: dict[str, bool] | None,
        prefill_cached: JsonValue) -> None:
    """The decode's KV load failed and it computed the prompt (load_failure_policy recompute): its answer says so,
    and its own prefix-cache hits are what the request reused. The mark is the proxy's, not the client's."""
    url, prefill, decode = deployment
    prefill.cached, decode.recomputed = prefill_cached, True
    body: dict[str, JsonValue] = {} if stream is None else {"stream": True, "stream_options": stream or None}
    try:
        usage = _usage_of(url, path, **body)
    finally:
        decode.recomputed = False
    assert usage["prompt_tokens_details"] == {"cached_tokens": DECODE_CACHED}, usage
