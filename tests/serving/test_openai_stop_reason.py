"""Every choice carries vLLM's `stop_reason` besides `finish_reason`, through a real instance's HTTP API (tiny model,
CPU, in this process): the stop_token_ids entry or the stop string that ended it, null when it ended otherwise
(length; an EOS), in whole answers and in the last streamed chunk of completions and chat. The key was missing, so
a client reading which of its stop strings matched (vLLM answers `choice["stop_reason"]`) got a KeyError.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.http.sse import parse_sse
from tests.serving.helpers import in_process_instance, tiny_colocated

TIMEOUT = 120.0  # a loaded 2-core machine
GREEDY = {"model": "tiny", "max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
ROUTES = {"/v1/completions": {"prompt": "Tell me about a place"},
          "/v1/chat/completions": {"messages": [{"role": "user", "content": "Tell me about a place"}]}}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with in_process_instance(tiny_colocated(256), "stop-reason-0") as (address, _):
        yield address


def _last_choice(url: str, path: str, stream: bool, **body: Any) -> dict[str, Any]:
    """The answer's one choice, or a stream's last chunk's (after checking every earlier one says null)."""
    answer = httpx.post(f"{url}{path}", json={**GREEDY, **ROUTES[path], **body, "stream": stream}, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    if not stream:
        (choice,) = answer.json()["choices"]
        return dict(choice)
    chunks = [json.loads(e)["choices"] for e in parse_sse(answer.content)[:-1]]
    choices = [c for cs in chunks for c in cs]
    assert all("stop_reason" in c and c["stop_reason"] is None for c in choices[:-1]), choices
    return dict(choices[-1])


def _output_ids(url: str, path: str) -> list[int]:
    answer = httpx.post(f"{url}{path}", json={**GREEDY, **ROUTES[path], "return_token_ids": True}, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    ids: list[int] = answer.json()["choices"][0]["token_ids"]
    return ids


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("path", list(ROUTES))
def test_stop_reason_names_what_stopped_the_choice(url: str, path: str, stream: bool) -> None:
    ended = _last_choice(url, path, stream)
    assert ended["finish_reason"] == "length" and ended["stop_reason"] is None, ended

    stop_id = _output_ids(url, path)[4]
    by_id = _last_choice(url, path, stream, stop_token_ids=[stop_id])
    assert by_id["finish_reason"] == "stop" and by_id["stop_reason"] == stop_id, by_id

    whole = _last_choice(url, path, False)
    text = whole["text"] if "text" in whole else whole["message"]["content"]
    stop = next(p for p in (text[i:i + 2] for i in range(2, len(text) - 1)) if p.isascii() and p.isalnum())
    by_string = _last_choice(url, path, stream, stop=["never in this text \x00", stop])
    assert by_string["finish_reason"] == "stop" and by_string["stop_reason"] == stop, by_string


def _text(url: str, stream: bool, **body: Any) -> tuple[str, str, Any]:
    """A completion's (text, finish_reason, stop_reason), a stream's chunks joined."""
    request = {**GREEDY, "prompt": "hello", "max_tokens": 8, "min_tokens": 3, **body, "stream": stream}
    answer = httpx.post(f"{url}/v1/completions", json=request, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    if not stream:
        (choice,) = answer.json()["choices"]
        return choice["text"], choice["finish_reason"], choice["stop_reason"]
    choices = [c for e in parse_sse(answer.content)[:-1] for c in json.loads(e)["choices"]]
    return "".join(c["text"] for c in choices), choices[-1]["finish_reason"], choices[-1]["stop_reason"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_longer_stop_string_beside_a_short_one_changes_nothing(url: str, stream: bool) -> None:
    """A short stop string lying wholly in the text of the first min_tokens tokens is no stop; sending a longer one
    beside it (it sized the searched window) made the short one "found" at the next token: the answer was cut back
    into that text, after a stream had already sent it."""
    plain = _text(url, False, stop=[])
    assert "th" in plain[0][:4], plain  # the tiny model's first tokens hold the short stop string
    assert _text(url, stream, stop=["th"]) == plain
    assert _text(url, stream, stop=["th", "zzzzzzzz"]) == plain
