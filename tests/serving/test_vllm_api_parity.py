"""Where pdlaunch's OpenAI API answered other than vLLM's (0.11-0.13) does, through the HTTP path: a decode
instance asked directly (it computes the prompt itself, as a colocated one) and the proxy in front of a prefill and
that decode (tiny model, real NIXL on CPU, in this process), which must pass the instances' answers on unchanged.

- `tool_choice: "required"` with `tools: []` is a plain chat answer (vLLM: "none" without tools, as OpenAI); a
  tool_choice other than "none" without tools is a 400 naming tool_choice (vLLM refuses "auto" too).
- `stream_options: {}` (or OpenAI's `{"include_obfuscation": false}`) with `stream: true` gets no usage chunk:
  vLLM's include_usage defaults to false since vllm-project/vllm#36379, as OpenAI's (it defaulted to true here, and a
  client loop reading `chunk.choices[0]` broke on the extra chunk). A key sent as null (vLLM types them `bool | None`)
  is not sent (was a 400). Without the usage chunk no chunk carries usage (a stream's last choice chunk carried it).
- `include_reasoning: true`, vLLM's default (a no-op without a reasoning parser), was a 400; it passes, as `false`.
- Fields vLLM added by 2026 that ask for what this server does not do (`logprob_token_ids`, `thinking_token_budget`,
  `repetition_detection`, `watermarking`, ...) were ignored with only a log line (`logprob_token_ids`: other logprobs
  came back); each is a 400 naming it and why, and passes at its neutral value (vLLM's `thinking_token_budget: -1`).
- `stream_interval` above 1 was a 400 on any request, where vLLM takes it (it batches a stream's chunks: no effect on
  a whole answer); it passes without a stream, stays refused on one, and a value vLLM refuses (0, -1, 2.5) is a 400
  naming it in our words.
- An error without a named code carries vLLM's `code`, the HTTP status as a number (was the string "400").
- Whole chat and completion answers carry `system_fingerprint: null`, as vLLM's; stream chunks do not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.http.sse import parse_sse
from tests.serving.tiny_instances import TIMEOUT, tiny_pd

HI = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def urls() -> Iterator[dict[str, str]]:
    """{"decode": the decode instance's URL, "proxy": the proxy's}."""
    with tiny_pd("parity") as pd:
        yield {"decode": pd.decode, "proxy": pd.proxy}


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"model": "tiny", "max_tokens": 3, **body}, timeout=TIMEOUT)


VIA = pytest.mark.parametrize("via", ["decode", "proxy"])


@VIA
def test_required_tool_choice_with_no_tools_is_plain_chat(urls: dict[str, str], via: str) -> None:
    answer = post(urls[via], "/v1/chat/completions", {"messages": HI, "tools": [], "tool_choice": "required"})
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert isinstance(choice["message"]["content"], str) and not choice["message"].get("tool_calls"), choice
    assert choice["finish_reason"] in ("stop", "length"), choice


@VIA
@pytest.mark.parametrize("tools", ["absent", None])
@pytest.mark.parametrize("tool_choice", ["required", "auto", {"type": "function", "function": {"name": "f"}}],
                         ids=["required", "auto", "named"])
def test_tool_choice_without_tools_is_refused(urls: dict[str, str], via: str, tools: Any, tool_choice: Any) -> None:
    body: dict[str, Any] = {"messages": HI, "tool_choice": tool_choice}
    if tools != "absent":
        body["tools"] = tools
    answer = post(urls[via], "/v1/chat/completions", body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "tool_choice", answer.text


@VIA
def test_none_tool_choice_without_tools_is_plain_chat(urls: dict[str, str], via: str) -> None:
    answer = post(urls[via], "/v1/chat/completions", {"messages": HI, "tool_choice": "none"})
    assert answer.status_code == 200, answer.text
    assert isinstance(answer.json()["choices"][0]["message"]["content"], str), answer.text


@VIA
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("options", "usage_chunk"), [
    ({}, False), ({"include_obfuscation": False}, False), ({"include_usage": True}, True),
    ({"include_usage": False}, False), (None, False), ({"include_usage": None}, False),
    ({"include_usage": True, "continuous_usage_stats": None}, True)],
    ids=["empty", "obfuscation-off", "include_usage", "no_usage", "null", "include-null", "continuous-null"])
def test_stream_options_include_usage_defaults_to_false(urls: dict[str, str], via: str, path: str,
                                                       options: Any, usage_chunk: bool) -> None:
    prompt = {"prompt": "hi"} if path == "/v1/completions" else {"messages": HI}
    answer = post(urls[via], path, {**prompt, "stream": True, "stream_options": options})
    assert answer.status_code == 200, answer.text
    events = parse_sse(answer.content)
    assert events[-1] == "[DONE]", events
    chunks = [json.loads(e) for e in events[:-1]]
    assert usage_chunk or all(c["choices"] for c in chunks), chunks  # a `chunk.choices[0]` loop reads every one
    separate = [c for c in chunks if c["choices"] == []]
    assert len(separate) == usage_chunk, chunks
    if usage_chunk:
        assert chunks[-1] is separate[0] and separate[0]["usage"]["completion_tokens"] == 3, chunks
    # vLLM's chunks carry usage only in that chunk: a client that did not ask for usage gets none
    assert [c for c in chunks if "usage" in c] == separate, chunks


@VIA
def test_an_error_without_a_named_code_carries_the_status_as_a_number(urls: dict[str, str], via: str) -> None:
    """vLLM's ErrorInfo.code is the HTTP status, an int: a validation error, an unknown path, a prompt too long for
    the model (through the proxy: the prefill leg's 400, passed on), a method the path does not take."""
    answers = {
        400: post(urls[via], "/v1/completions", {"prompt": "hi", "temperature": "hot"}),
        404: httpx.get(f"{urls[via]}/v1/nowhere", timeout=TIMEOUT),
        405: httpx.get(f"{urls[via]}/v1/completions", timeout=TIMEOUT),
    }
    too_long = post(urls[via], "/v1/completions", {"prompt": "hi " * 400})
    for status, answer in [*answers.items(), (400, too_long)]:
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == status, error
    assert "max_model_len" in too_long.json()["error"]["message"], too_long.text


@VIA
def test_a_named_code_stays_a_string(urls: dict[str, str], via: str) -> None:
    """Codes that name the condition (README: invalid_api_key, shutting_down, ...) are OpenAI's strings."""
    answer = post(urls[via], "/v1/completions", {"model": "not-served", "prompt": "hi"})
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] == "model_not_found", answer.text


@VIA
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_whole_answers_carry_system_fingerprint_null_and_chunks_do_not(urls: dict[str, str], via: str,
                                                                      path: str) -> None:
    prompt = {"prompt": "hi"} if path == "/v1/completions" else {"messages": HI}
    whole = post(urls[via], path, prompt)
    assert whole.status_code == 200, whole.text
    body = whole.json()
    assert "system_fingerprint" in body and body["system_fingerprint"] is None, body
    streamed = post(urls[via], path, {**prompt, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200, streamed.text
    chunks = [json.loads(e) for e in parse_sse(streamed.content) if e != "[DONE]"]
    assert chunks and not any("system_fingerprint" in c for c in chunks), chunks


@VIA
@pytest.mark.parametrize("include", [True, False, None])
def test_include_reasoning_is_a_no_op_without_a_reasoning_parser(urls: dict[str, str], via: str,
                                                                 include: bool | None) -> None:
    plain = post(urls[via], "/v1/chat/completions", {"messages": HI, "temperature": 0})
    answer = post(urls[via], "/v1/chat/completions", {"messages": HI, "temperature": 0, "include_reasoning": include})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"], answer.text


NEWER = [
    ("/v1/completions", "logprob_token_ids", [5, 6], {"logprobs": 1}, "top alternatives"),
    ("/v1/chat/completions", "logprob_token_ids", [5, 6], {"logprobs": True}, "top alternatives"),
    ("/v1/chat/completions", "thinking_token_budget", 1, {}, "reasoning parser"),
    ("/v1/completions", "thinking_token_budget", 1, {}, "reasoning parser"),
    ("/v1/completions", "repetition_detection", {"max_pattern_size": 2, "min_count": 2}, {}, "repetition detection"),
    ("/v1/chat/completions", "repetition_detection", {"max_pattern_size": 2, "min_count": 2}, {},
     "repetition detection"),
    ("/v1/completions", "watermarking", True, {}, "watermark"),
    ("/v1/completions", "stream_interval", 4, {"stream": True}, "each engine step"),
    ("/v1/chat/completions", "stream_interval", 4, {"stream": True}, "each engine step"),
]


@VIA
@pytest.mark.parametrize(("path", "field", "value", "beside", "why"), NEWER,
                         ids=[f"{f}-{p.split('/')[-1]}" for p, f, *_ in NEWER])
def test_a_newer_vllm_field_that_asks_for_something_is_refused(urls: dict[str, str], via: str, path: str, field: str,
                                                                value: Any, beside: dict[str, Any], why: str) -> None:
    prompt = {"prompt": "hi"} if path == "/v1/completions" else {"messages": HI}
    answer = post(urls[via], path, {**prompt, **beside, field: value})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and field in error["message"] and why in error["message"], error


PATHS = pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])


def prompt_of(path: str) -> dict[str, Any]:
    return {"prompt": "hi"} if path == "/v1/completions" else {"messages": HI}


@VIA
@PATHS
@pytest.mark.parametrize("interval", [1, 2, 4, 2**40])
def test_stream_interval_without_a_stream_passes(urls: dict[str, str], via: str, path: str, interval: int) -> None:
    """vLLM's stream_interval batches a stream's chunks: it has no effect on a whole answer, which vLLM gives for any
    positive interval (was a 400 above 1, stream or not)."""
    for beside in ({}, {"stream": False}, {"stream": None}):
        answer = post(urls[via], path, {**prompt_of(path), **beside, "temperature": 0, "stream_interval": interval})
        assert answer.status_code == 200, answer.text
        plain = post(urls[via], path, {**prompt_of(path), **beside, "temperature": 0})
        assert answer.json()["choices"] == plain.json()["choices"], answer.text


@VIA
@PATHS
def test_stream_interval_1_passes_on_a_stream(urls: dict[str, str], via: str, path: str) -> None:
    answer = post(urls[via], path, {**prompt_of(path), "stream": True, "stream_interval": 1})
    assert answer.status_code == 200, answer.text
    assert parse_sse(answer.content)[-1] == "[DONE]", answer.text


@VIA
@PATHS
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(("interval", "got"), [(0, "0"), (-3, "-3"), (2.5, "2.5"), (2.0, "2.0"), ("4", '"4"'),
                                               (True, "true"), ([4], "[4]")])
def test_an_invalid_stream_interval_is_a_400_naming_it(urls: dict[str, str], via: str, path: str, stream: bool,
                                                       interval: Any, got: str) -> None:
    """vLLM's bound (SamplingParams: at least 1, an integer), in our words, stream or not."""
    answer = post(urls[via], path, {**prompt_of(path), "stream": stream, "stream_interval": interval})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "stream_interval", error
    assert error["message"].startswith("stream_interval must be a positive integer"), error
    assert f"got {got}" in error["message"] and "Input should" not in error["message"], error


@VIA
@pytest.mark.parametrize(("field", "value"), [("thinking_token_budget", -1), ("watermarking", False),
                                              ("repetition_detection", {}), ("logprob_token_ids", None),
                                              ("session_id", "conversation-1"), ("return_token_offsets", True)])
def test_a_newer_vllm_field_that_asks_for_nothing_passes(urls: dict[str, str], via: str, field: str,
                                                         value: Any) -> None:
    answer = post(urls[via], "/v1/chat/completions", {"messages": HI, field: value})
    assert answer.status_code == 200, answer.text
