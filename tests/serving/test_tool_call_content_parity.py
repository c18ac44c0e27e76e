"""A client sees the same answer whether it streams or not: for one model output under tool_choice auto, the
content that the streamed deltas add up to is the whole answer's content, and the calls are the same calls.
The text before a Hermes / Qwen `<tool_call>` is kept as written, whitespace included, as vLLM's hermes parser
keeps it (its whole answers: the text before the first call, None when there is none)."""

from __future__ import annotations

import json
import random

import pytest

from pdlaunch.http import JsonObject
from pdlaunch.server.tool_calls import ToolCalling, tool_calling_of
from pdlaunch.server.tool_stream import ToolStream

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'

OUTPUTS = [
    f"Let me check the weather.\n\n{CALL}",  # text, then a blank line, then the call (Qwen 2.5's usual shape)
    f"Checking. {CALL}",
    f"  Leading and trailing spaces  \n{CALL}\n{CALL}",
    f"\n\n{CALL}",  # only whitespace before the call
    CALL,
    f"{CALL}\ntrailing words after the call",
    'Just words, no call.\n',
    "<tool_call>{broken</tool_call> and more",  # not a call: all of it is content
    'Cut short <tool_call>{"name": "get_wea',  # max_tokens cut the call: content
    '  {"name": "get_weather", "parameters": {"city": "Oslo"}}',  # Llama 3 JSON
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}',
    "{not json} but words",
    "Ends with half a marker <tool_",
    "<|python_tag|>print(1)",  # Llama 3's tag, kept in the decoded text (special tokens), then no call
    '  <|python_tag|>{"name": "get_weather"} and words',
]


def _auto() -> ToolCalling:
    calling = tool_calling_of([WEATHER], "auto")
    assert calling is not None and calling.mode == "auto"
    return calling


def _pieces(text: str, seed: int) -> list[str]:
    """`text` cut at random places (seed 0: one character a piece), as a model's tokens arrive."""
    if seed == 0:
        return list(text)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def _streamed(text: str, seed: int) -> tuple[str, list[JsonObject]]:
    stream = ToolStream(_auto())
    pieces = _pieces(text, seed)
    deltas = [stream.delta(p, finished=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    content = "".join(str(d.get("content", "")) for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]  # type: ignore[union-attr]
    return content, calls


def _named(calls: list[JsonObject]) -> list[tuple[object, object]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]  # type: ignore[index]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("text", OUTPUTS)
def test_streamed_content_and_calls_are_the_whole_answers(text: str, seed: int) -> None:
    whole_content, whole_calls = _auto().parse(text)
    content, calls = _streamed(text, seed)
    assert content == (whole_content or "")
    assert _named(calls) == _named(whole_calls)


@pytest.mark.parametrize(("text", "content"), [
    (f"Let me check the weather.\n\n{CALL}", "Let me check the weather.\n\n"),
    (f"\n\n{CALL}", "\n\n"),
    (CALL, None),
])
def test_text_before_a_hermes_call_is_kept_as_written(text: str, content: str | None) -> None:
    parsed_content, calls = _auto().parse(text)
    assert parsed_content == content and _named(calls) == [("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize("text", [
    "<|python_tag|>print(1)",
    '  <|python_tag|>{"name": "get_weather"} and words',
    "Words <|python_tag|> inside",
])
def test_a_llama_python_tag_kept_in_the_decoded_text_stays_in_the_content(text: str) -> None:
    """Text decoded with its special tokens (the client sent skip_special_tokens false; or a checkpoint with special
    tool-call markers, whose output vLLM's hermes parser has decoded with them): an answer which is no call is its
    text as decoded, the <|python_tag|> that opens it too, as vLLM's llama3_json (and hermes) parser gives it back;
    dropping it took from the client what it asked to see. Skipped (the default), the text has no tag to keep."""
    assert _auto().parse(text) == (text, [])
    for seed in (0, 1, 2, 3):
        assert _streamed(text, seed) == (text, [])
