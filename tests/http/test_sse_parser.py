"""The SSE parser the proxy relays every instance stream through (http/sse.py)."""

from __future__ import annotations

import pytest

from pdlaunch.http.sse import SSEEventTooLarge, SSEParser, sse_data
from pdlaunch.proxy.instances import Instance
from pdlaunch.proxy.translate import OpenAIError
from pdlaunch.proxy.upstream import stream_payloads


def test_a_crlf_split_between_two_chunks_still_ends_the_event() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r\n\r") == [] and parser.pending == b"data: a\n\r"
    assert parser.feed(b"\n") == ["a"] and parser.pending == b""


def test_an_event_in_many_chunks_comments_and_multi_line_data() -> None:
    parser = SSEParser()
    body = b'data: {"x": 1}\n\n: a comment\n\ndata: one\ndata: two\n\ndata: [DONE]\n\n'
    got = [payload for i in range(len(body)) for payload in parser.feed(body[i:i + 1])]
    assert got == ['{"x": 1}', "one\ntwo", "[DONE]"] and parser.pending == b""


def test_an_event_past_the_limit_is_refused_and_a_relay_names_the_instance() -> None:
    parser = SSEParser(max_event_bytes=64)
    assert parser.feed(b"data: " + b"x" * 50 + b"\n\n") == ["x" * 50]  # events that end stay under it
    with pytest.raises(SSEEventTooLarge, match="passed 64 bytes"):
        for _ in range(10):
            parser.feed(b"data: " + b"y" * 10)
    decode = Instance("decode", "http://127.0.0.1:1", "decode-0")
    with pytest.raises(OpenAIError) as caught:
        stream_payloads(SSEParser(max_event_bytes=8), b"data: 0123456789", decode)
    assert caught.value.status == 502
    assert "decode-0" in caught.value.message and "passed 8 bytes" in caught.value.message


def test_an_event_of_several_data_lines_relayed_is_the_same_event() -> None:
    """A foreign server may split one event's data over several `data:` lines (the parser joins them with "\\n",
    as SSE says); relayed, every line keeps its `data:` field, so the client reads the same payload."""
    payload = '{"a":\n1}'
    parser = SSEParser()
    assert parser.feed(b"data: {\"a\":\ndata: 1}\n\n") == [payload]
    relayed = SSEParser()
    assert relayed.feed(sse_data(payload)) == [payload]
    assert sse_data(payload) == b'data: {"a":\ndata: 1}\n\n'
