"""SSE framing: what the server writes is what the proxy's incremental parser reads back, however split."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from pdlaunch.http.sse import DONE, SSEParser, parse_sse, sse_event


def test_event_roundtrip_with_done() -> None:
    body = sse_event({"a": 1}) + sse_event({"text": "two\nlines"}) + DONE
    events = parse_sse(body)
    assert [json.loads(e) for e in events[:2]] == [{"a": 1}, {"text": "two\nlines"}]
    assert events[2] == "[DONE]"


def test_crlf_comments_and_multiline_data() -> None:
    parser = SSEParser()
    events = parser.feed(b": keep-alive\r\n\r\ndata: first\r\ndata: second\r\n\r\nevent: x\ndata:{\"k\":2}\n\n")
    assert events == ["first\nsecond", '{"k":2}']
    assert parser.pending == b""


def test_truncated_event_stays_pending() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"a"') == []
    assert parser.pending == b'data: {"a"'
    assert parser.feed(b": 1}\n\n") == ['{"a": 1}']


@settings(max_examples=60, deadline=None)
@given(
    payloads=st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_any_chunking_gives_the_same_events(payloads: list[dict[str, str]], cuts: list[int]) -> None:
    body = b"".join(sse_event(p) for p in payloads) + DONE
    parser = SSEParser()
    events: list[str] = []
    start = 0
    for cut in sorted(set(c for c in cuts if c < len(body))) + [len(body)]:
        events += parser.feed(body[start:cut])
        start = cut
    assert [json.loads(e) for e in events[:-1]] == payloads
    assert events[-1] == "[DONE]"
