"""How one `bench serve` request's failure reads: the time it says it waited is the one that ran out."""

from __future__ import annotations

import asyncio

import httpx

from pdlaunch.bench.openai_client import CONNECT_TIMEOUT_S, send_request
from pdlaunch.bench.report import RequestResult
from pdlaunch.bench.serve_config import ServeBenchConfig
from pdlaunch.bench.workload import BenchRequest


def _send(handler: httpx.MockTransport) -> RequestResult:
    cfg = ServeBenchConfig(base_url="http://127.0.0.1:8000", request_timeout=600.0)

    async def one() -> RequestResult:
        async with httpx.AsyncClient(transport=handler) as client:
            return await send_request(client, cfg, "m", BenchRequest(prompt=[11, 12], prompt_len=2, output_len=2), 0.0)

    return asyncio.run(one())


def test_a_connect_timeout_says_the_connect_wait_not_the_request_timeout() -> None:
    """The connection's own limit (CONNECT_TIMEOUT_S) ran out: the error said `timed out after 600s waiting for URL
    to finish a request` after 30 s, pointing at --request-timeout and at a server that was slow to answer."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    result = _send(httpx.MockTransport(refuse))
    assert not result.success
    assert "600" not in result.error
    assert result.error == (
        f"could not connect to http://127.0.0.1:8000/v1/completions within {CONNECT_TIMEOUT_S:g}s "
        "(the server accepted no connection in that time: overloaded, or an address that drops "
        "connections)"
    )


def test_a_redirect_says_where_to() -> None:
    """A redirect's body is mostly empty: the request's error read `HTTP 307: ` and nothing else (an http:// address
    a gateway sends on to https://, a path the server moved)."""

    def moved(request: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"location": "https://127.0.0.1:8443/v1/completions"})

    result = _send(httpx.MockTransport(moved))
    assert not result.success
    assert result.error == (
        "HTTP 307: redirected to https://127.0.0.1:8443/v1/completions, which bench serve does "
        "not follow: give that server in --base-url"
    )


def test_a_whole_answer_not_streamed_is_said_so_not_cut_short() -> None:
    """A server that ignores `stream: true` answers one JSON completion: its request failed as `the stream ended
    before [DONE] after 0 chunk(s): the answer was cut short`, as if a stream had broken off."""

    def whole(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "object": "text_completion",
                "choices": [{"index": 0, "text": "a b"}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 2},
            },
        )

    result = _send(httpx.MockTransport(whole))
    assert not result.success
    assert result.error == (
        "the server answered application/json with no stream event (`data:` line): it did not "
        "stream the answer, which bench serve asks for (stream: true) to time its tokens"
    )


def test_an_event_stream_that_ends_before_its_first_event_is_cut_short() -> None:
    def empty(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream; charset=utf-8"}, content=b"")

    assert _send(httpx.MockTransport(empty)).error == (
        "the stream ended before [DONE] after 0 chunk(s): the answer was cut short"
    )
