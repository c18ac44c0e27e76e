"""A decode leg's stream that is not what an instance should send (bytes that are not UTF-8, token ids that are not
integers, a payload that is not a JSON object) never drops the client's connection: the stream ends with an SSE
error event (then [DONE]), or passes the payload through as the proxy does for one prompt; a list of prompts is no
different, and one prompt's stream that fails ends the merged stream with an error, never a silent [DONE]. A whole
(not streamed) answer that is no valid JSON object is a 502 naming the instance, not a 500 at the proxy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from pdlaunch.http.sse import ClosingStreamingResponse, parse_sse
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.prompt_lists import MergedStream
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_hardening import SECRET, Prefill


def _chunk(**choice: Any) -> bytes:
    body = {"id": "cmpl-d", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": "t", "finish_reason": None, "token_ids": [5], **choice}]}
    return f"data: {json.dumps(body)}\n\n".encode()


# A scripted decode's whole answer (not streamed), by the prompt's name.
BAD_ANSWERS = {
    "nan-answer": b'{"id":"cmpl-d","choices":[{"index":0,"text":"t","logprobs":NaN}]}',
    "surrogate-answer": b'{"id":"cmpl-d","choices":[{"index":0,"text":"\\ud800"}]}',
    "not-utf8-answer": b'{"id":"cmpl-d","choices":[{"index":0,"text":"\xff"}]}',
}
# The event a scripted decode sends after one good chunk, by the prompt's name.
BAD_EVENTS = {
    "not-utf8": b'data: {"choices":[{"index":0,"text":"\xff\xfe"}]}\n\n',
    "nan-id": b'data: {"id":"cmpl-d","choices":[{"index":0,"text":"t","finish_reason":null,"token_ids":[NaN]}]}\n\n',
    "not-json": b"data: hello\n\n",
    "json-list": b"data: [1,2]\n\n",
}


class ScriptedDecode:
    """A text prompt: one good chunk (with the prompt's ids), then the prompt's bad event, then [DONE]. A continuation
    (a prompt of token ids): one finishing chunk and [DONE]."""

    def __init__(self) -> None:
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.post("/v1/completions")(self.completions)

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        prompt = body["prompt"]
        if not body.get("stream"):
            return Response(BAD_ANSWERS[prompt], media_type="application/json")

        async def events() -> AsyncIterator[bytes]:
            if isinstance(prompt, list):
                yield _chunk(text="!", token_ids=[6], finish_reason="length")
            else:
                yield _chunk(prompt_token_ids=[1, 2])
                yield BAD_EVENTS[prompt]
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def proxies() -> Iterator[dict[int, str]]:
    """Proxy URLs by migration limit (0, 1), in front of one prefill and two scripted decodes."""
    ports = PortAllocator("127.0.0.1")
    with ThreadServer(Prefill().app, ports.free("prefill")) as p, \
            ThreadServer(ScriptedDecode().app, ports.free("d0")) as d0, \
            ThreadServer(ScriptedDecode().app, ports.free("d1")) as d1:
        urls: dict[int, str] = {}
        servers: list[ThreadServer] = []
        try:
            for limit in (0, 1):
                pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d0.url, "decode-0"),
                                     Instance("decode", d1.url, "decode-1")])
                server = ThreadServer(build_proxy_app(pool, 60.0, deployment_secret=SECRET, migration_limit=limit),
                                      ports.free(f"proxy{limit}")).__enter__()
                servers.append(server)
                urls[limit] = server.url
                wait_for(lambda: httpx.get(f"{urls[limit]}/health").status_code == 200, "the proxy's instances")
            yield urls
        finally:
            for server in servers:
                server.__exit__()


def _stream(url: str, prompt: str | list[str]) -> list[str]:
    """The payloads of the proxy's stream (the client's connection must end cleanly)."""
    answer = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 10, "stream": True},
                        timeout=30)
    assert answer.status_code == 200, answer.text
    return [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("limit", [0, 1])
def test_an_event_that_is_not_utf8_ends_the_stream_with_an_error_event(proxies: dict[int, str], limit: int) -> None:
    payloads = _stream(proxies[limit], "not-utf8")
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == "instance_failed" and "not UTF-8" in error["message"], error


def test_a_token_id_that_is_not_an_integer_ends_a_migrating_stream_with_an_error_event(proxies: dict[int, str]) -> None:
    """The ids a migration continues from must be integers: NaN (which Python's JSON reads) is no id."""
    payloads = _stream(proxies[1], "nan-id")
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[0])["choices"][0]["text"] == "t"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == "instance_failed" and "token_ids" in error["message"], error


@pytest.mark.parametrize("limit", [0, 1])
@pytest.mark.parametrize("bad", ["not-json", "json-list"])
def test_a_prompt_lists_merged_stream_passes_a_payload_that_is_no_json_object_through(
        proxies: dict[int, str], limit: int, bad: str) -> None:
    """As the stream of one prompt does (the client judges it), rather than dropping the connection."""
    payloads = _stream(proxies[limit], [bad, bad])
    assert payloads[-1] == "[DONE]"
    assert sorted(p for p in payloads if not p.startswith("{")) == sorted([BAD_EVENTS[bad][6:-2].decode()] * 2
                                                                          + ["[DONE]"])
    assert sorted(json.loads(p)["choices"][0]["index"] for p in payloads if p.startswith("{")) == [0, 1]


def test_a_prompt_stream_that_fails_ends_the_merged_stream_with_an_error_event() -> None:
    """Not with [DONE] as if the prompt's answer were whole."""
    async def failing() -> AsyncIterator[bytes]:
        yield _chunk()
        raise RuntimeError("the relay broke")

    async def whole() -> AsyncIterator[bytes]:
        yield _chunk(finish_reason="length")
        yield b"data: [DONE]\n\n"

    async def nothing() -> None:
        pass

    async def relayed() -> bytes:
        merged = MergedStream([ClosingStreamingResponse(failing(), on_close=nothing),
                               ClosingStreamingResponse(whole(), on_close=nothing)], 1, "cmpl-m")
        return b"".join([event async for event in merged.events()])

    payloads = parse_sse(asyncio.run(asyncio.wait_for(relayed(), 30)))
    assert "[DONE]" not in payloads
    error = json.loads(payloads[-1])["error"]
    assert error["type"] == "internal_server_error" and "prompt 0" in error["message"], error


@pytest.mark.parametrize("limit", [0, 1])
@pytest.mark.parametrize("bad", sorted(BAD_ANSWERS))
def test_a_whole_answer_that_is_no_valid_json_object_is_a_502_naming_the_decode(
        proxies: dict[int, str], limit: int, bad: str) -> None:
    answer = httpx.post(f"{proxies[limit]}/v1/completions", json={"prompt": bad, "max_tokens": 10}, timeout=30)
    assert answer.status_code == 502, answer.text
    error = answer.json()["error"]
    assert error["code"] == "instance_failed" and "decode-" in error["message"], error
