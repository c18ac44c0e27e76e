"""OpenAI response and error shapes found wrong by an audit of the HTTP API, through a real instance's HTTP API
(tiny model, CPU, in this process):

- Completions' `top_logprobs` hold the chosen token as well as the `logprobs` most likely ones (OpenAI's legacy
  completions: "up to logprobs+1 elements"; vLLM's): `logprobs: 0` answered `{}` at every position, and a
  sampled token outside the top ones was missing from its position's entry.
- With `skip_special_tokens: false` a special token was "" in the logprobs while the text held it, so text_offset
  did not index the text. A logprob's token is the token's own text now, a special token's whatever
  skip_special_tokens says (vLLM's: tests/serving/test_logprob_special_tokens.py), and text_offset indexes the text.
- `echo: true` with `max_tokens: 0` (how lm-evaluation-harness scores a prompt, which vLLM answers with the prompt
  and its logprobs) was a 400 "Input should be greater than or equal to 1"; it is the prompt, its logprobs and no
  output token now, and `max_tokens: 0` without echo says what it is for.
- A malformed tool names its place: `tools.1.function` and that in the message (was "tools: Field required" with
  no index), and a tool's parameters schema that does not compile names `tools...`, not `tool_choice`.
- A logit_bias key that is not a token id names itself and the shape to send (was
  `logit_bias.abc.[key]: Input should be a valid integer`, param `logit_bias.abc.[key]`).
- A chat content part this text model cannot take (an image, a part without `type`) is a 400 whose param and
  message name the message and the part and say what to send, not `param: "messages"` and
  "content part type None is not supported".
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
SAMPLED = {"model": "tiny", "prompt": "Tell me about a place", "max_tokens": 12, "temperature": 5.0, "seed": 3,
           "ignore_eos": True}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with in_process_instance(tiny_colocated(256), "audit-api-shapes-0") as (address, _):
        yield address


def _completion_logprobs(url: str, stream: bool, **body: Any) -> dict[str, list[Any]]:
    """The choice's logprobs, a stream's chunks folded into one."""
    answer = httpx.post(f"{url}/v1/completions", json={**SAMPLED, **body, "stream": stream}, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    if not stream:
        logprobs: dict[str, list[Any]] = answer.json()["choices"][0]["logprobs"]
        return logprobs
    folded: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    events = parse_sse(answer.content)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        for choice in json.loads(event)["choices"]:
            for key in folded:
                folded[key] += (choice["logprobs"] or {}).get(key, [])
    return folded


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("k", [0, 1])
def test_completion_top_logprobs_name_the_chosen_token(url: str, k: int, stream: bool) -> None:
    logprobs = _completion_logprobs(url, stream, logprobs=k)
    assert len(logprobs["tokens"]) == 12
    outside_top = 0
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"],
                                   strict=True):
        assert top[token] == logprob, (token, logprob, top)
        assert 1 <= len(top) <= k + 1
        outside_top += len(top) == k + 1
    # temperature 5 samples tokens outside the top one: this checks the case where the chosen one is added
    assert k == 0 or outside_top > 0, logprobs["top_logprobs"]


@pytest.mark.parametrize(("part", "says"), [
    ({"type": "image_url", "image_url": {"url": "http://x/cat.png"}}, 'part 1 has type "image_url"'),
    ({"text": "hi"}, "part 1 has no `type`"),
], ids=["image", "no-type"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_a_content_part_a_text_model_cannot_take_is_named(url: str, path: str, part: dict[str, Any],
                                                          says: str) -> None:
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "look:"}, part]}]
    answer = httpx.post(f"{url}{path}", json={"model": "tiny", "messages": messages, "max_tokens": 2}
                        if path != "/tokenize" else {"model": "tiny", "messages": messages}, timeout=TIMEOUT)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "messages.1.content", error
    assert error["message"].startswith(f"messages.1.content: {says}"), error
    assert '{"type": "text", "text": "..."}' in error["message"], error
    # the instance still answers
    ok = httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT, json={
        "model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 2})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_logprob_tokens_name_special_tokens_and_text_offset_indexes_the_text(url: str, skip: bool) -> None:
    """A request steered onto the BOS token (a special token) by logit_bias: its logprobs' tokens name it whether the
    text keeps it or not, and text_offset indexes the text; chat's logprob tokens likewise."""
    tokenized = httpx.post(f"{url}/tokenize", json={"prompt": "hi", "return_token_strs": True}, timeout=TIMEOUT).json()
    bos, bos_text = tokenized["tokens"][0], tokenized["token_strs"][0]
    steer = {"max_tokens": 3, "temperature": 0.0, "logit_bias": {str(bos): 100}, "skip_special_tokens": skip}
    answer = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "logprobs": 1, **steer},
                        timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    tokens, offsets = choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert tokens == [bos_text] * 3 and choice["text"] == ("" if skip else bos_text * 3), choice
    assert offsets == [0 if skip else len(bos_text) * i for i in range(3)], choice
    chat = httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, **steer})
    assert chat.status_code == 200, chat.text
    chat_choice = chat.json()["choices"][0]
    content = chat_choice["message"]["content"]
    assert [e["token"] for e in chat_choice["logprobs"]["content"]] == [bos_text] * 3
    assert content == ("" if skip else bos_text * 3), chat_choice


def test_echo_with_max_tokens_0_scores_the_prompt(url: str) -> None:
    prompt = "The quick brown fox"
    body = {"model": "tiny", "prompt": prompt, "echo": True, "logprobs": 1, "temperature": 0.0}
    scored = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 0}, timeout=TIMEOUT)
    assert scored.status_code == 200, scored.text
    answer = scored.json()
    choice, usage = answer["choices"][0], answer["usage"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length", choice
    assert usage["completion_tokens"] == 0 and usage["total_tokens"] == usage["prompt_tokens"], usage
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == usage["prompt_tokens"] and logprobs["token_logprobs"][0] is None
    # the same prompt logprobs as an echo that also generates one token, without that token
    one = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 1}, timeout=TIMEOUT).json()["choices"][0]
    assert one["logprobs"]["tokens"][:-1] == logprobs["tokens"] and one["text"].startswith(prompt)
    assert one["logprobs"]["token_logprobs"][1:-1] == pytest.approx(logprobs["token_logprobs"][1:], abs=1e-5)
    plain = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={**body, "max_tokens": 0, "logprobs": None})
    assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == prompt, plain.text


@pytest.mark.parametrize("by", ["stop_token_ids", "stop"])
def test_echo_with_max_tokens_0_names_no_stop(url: str, by: str) -> None:
    """The one token the engine samples for an echo without output is no part of the answer: its finish_reason is
    "length" (max_tokens 0 reached), and a stop token or string that the left-out token hit is not its stop_reason
    (it was: "length" beside `stop_reason: 389`)."""
    body: dict[str, Any] = {"model": "tiny", "prompt": "hi", "echo": True, "temperature": 0.0}
    first = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT,  # the token greedy sampling takes after "hi"
                       json={**body, "max_tokens": 1, "return_token_ids": True}).json()["choices"][0]
    stop: int | str = first["token_ids"][0] if by == "stop_token_ids" else first["text"].removeprefix("hi")
    hit = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={**body, "max_tokens": 1, by: [stop]})
    assert hit.json()["choices"][0]["stop_reason"] == stop, hit.text  # the sampled token hits it
    answer = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={**body, "max_tokens": 0, by: [stop]})
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["text"] == "hi" and choice["finish_reason"] == "length", choice
    assert choice["stop_reason"] is None, choice


@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"max_tokens": 0}, "max_tokens", "only echo: true uses"),
    ({"max_tokens": 0, "echo": True, "stream": True}, "stream", "send stream: false"),
    ({"max_tokens": 0, "echo": True, "min_tokens": 1}, "min_tokens", "less than or equal to max_tokens (0)"),
], ids=["without-echo", "streamed", "min_tokens"])
def test_max_tokens_0_otherwise_says_what_it_is_for(url: str, fields: dict[str, Any], param: str, says: str) -> None:
    answer = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", **fields}, timeout=TIMEOUT)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and says in error["message"], error


F = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
BAD_SCHEMA = {"type": "function", "function": {"name": "g", "parameters": {
    "type": "object", "properties": {"x": {"type": "nonsense"}}}}}


@pytest.mark.parametrize(("tools", "tool_choice", "param"), [
    ([F, {"type": "function"}], None, "tools.1.function"),
    ([F, {"type": "function", "function": {"name": "g", "parameters": "x"}}], None, "tools.1.function.parameters"),
    ([F, BAD_SCHEMA], {"type": "function", "function": {"name": "g"}}, "tools.1.function.parameters"),
    ([F, BAD_SCHEMA], "required", "tools.1.function.parameters"),
], ids=["no-function", "parameters-not-an-object", "named-schema-invalid", "required-schema-invalid"])
def test_a_malformed_tool_is_named_where_it_is(url: str, tools: list[Any], tool_choice: Any, param: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": tools}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and param in error["message"], error


@pytest.mark.parametrize("key", ["abc", "1.5", "-3"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_logit_bias_key_that_is_no_token_id_is_named(url: str, path: str, key: str) -> None:
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 2, "logit_bias": {"5": 1, key: 3}}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    answer = httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "logit_bias", error
    assert error["message"].startswith(f"logit_bias: key {key!r} is not a token id") and '{"50256": -100}' in \
        error["message"], error
