"""Tool calling: parsing Qwen / Hermes and Llama 3 JSON calls, vLLM-shaped streamed deltas,
tool_choice validation, and required / named tool choice forced by structured output through a
real instance with the openai client (streaming and not)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.engine.outputs import RequestOutput
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.responses import ResponseBuilder
from pdlaunch.server.tool_call_parsers import parse_auto, parse_required
from pdlaunch.server.tool_calls import tool_calling_of
from pdlaunch.server.tool_stream import ToolStream
from tests.serving.helpers import in_process_instance

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 8},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


def test_hermes_blocks_after_text_and_llama_json() -> None:
    content, calls = parse_auto('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                                '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    assert content == "Let me look.\n"  # as written, as vLLM's hermes parser keeps it
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in calls)
    content, calls = parse_auto('<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; '
                                '{"name": "get_weather", "parameters": {"city": "Rome"}}')
    assert content is None and [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    assert parse_auto("Just words {not json}") == ("Just words {not json}", [])
    assert parse_auto("<tool_call>{broken</tool_call>")[1] == []


def test_llama_json_calls_with_a_semicolon_inside_an_argument() -> None:
    content, calls = parse_auto('<|python_tag|>{"name": "run_sql", "parameters": {"query": "SELECT 1; SELECT 2"}};'
                                ' {"name": "get_time", "parameters": {"zone": "UTC"}}')
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("run_sql", {"query": "SELECT 1; SELECT 2"}), ("get_time", {"zone": "UTC"})]
    text = '{"name": "get_time", "parameters": {}} and then some words'
    assert parse_auto(text) == (text, [])  # not only calls: plain content


@pytest.mark.parametrize(("choice", "output"), [
    ("auto", '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call>'),
    ("auto", '{"name": "get_weather", "parameters": {"city": "Zürich"}}'),
    ("required", '[{"name": "get_weather", "parameters": {"city": "Zürich"}}]'),
    ("required", '[{"name": "get_weather", "parameters": {"city": "Zürich"}}, {"name": "get_ti'),  # cut
])
def test_arguments_keep_non_ascii_text(choice: str, output: str) -> None:
    calling = tool_calling_of([WEATHER, TIME], choice)
    assert calling is not None
    calls = calling.parse(output)[1]
    assert calls[0]["function"]["arguments"] == '{"city": "Zürich"}'  # as vLLM writes it, not "Z\\u00fcrich"


def test_auto_stream_holds_back_a_call_and_sends_it_as_deltas() -> None:
    calling = tool_calling_of([WEATHER], "auto")
    assert calling is not None and calling.mode == "auto"
    stream = ToolStream(calling)
    pieces = ["Sure", ", checking.", "<tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}',
              "</tool_call>"]
    deltas = [stream.delta(p, finished=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert "".join(d.get("content", "") for d in deltas) == "Sure, checking."
    assert all("<" not in d.get("content", "") for d in deltas)
    last = deltas[-1]["tool_calls"]
    assert last[0]["index"] == 0 and last[0]["function"]["name"] == "get_weather"
    assert json.loads(last[0]["function"]["arguments"]) == {"city": "Oslo"}


def test_named_stream_opens_the_call_then_streams_arguments() -> None:
    stream = ToolStream(tool_calling_of([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}))
    first, second, end = stream.delta('{"zone"', False), stream.delta(': "UTC"}', False), stream.delta("", True)
    assert first["tool_calls"][0]["function"] == {"name": "get_time", "arguments": '{"zone"'}
    assert first["tool_calls"][0]["id"].startswith("chatcmpl-tool-") and first["tool_calls"][0]["type"] == "function"
    assert second == {"tool_calls": [{"index": 0, "function": {"arguments": ': "UTC"}'}}]} and end == {}


@pytest.mark.parametrize(("tools", "choice", "param"), [
    (None, "required", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([{"type": "function", "function": {"description": "no name"}}], "auto", "tools.function.name"),
])
def test_bad_tool_requests_name_the_field(tools: Any, choice: Any, param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        tool_calling_of(tools, choice)
    assert info.value.status == 400 and info.value.param.startswith(param.split(".")[0])
    assert info.value.param.replace(".0", "") == param


def test_none_keeps_tools_out_and_parallel_false_limits_required() -> None:
    none = tool_calling_of([WEATHER], "none")
    assert none is not None and none.structured_output() is None and none.template_tools()[0]["function"]["name"]
    assert none.parse('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>')[1] == []
    assert ToolStream(none).delta("<tool_call>", False) == {"content": "<tool_call>"}
    calling = tool_calling_of([WEATHER, TIME], "required", parallel=False)
    assert calling is not None and json.loads(calling.structured_output().value)["maxItems"] == 1  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny"}, "cache": {"num_gpu_blocks": 96},
        "security": {"deployment_secret": "test-deployment-secret-0123456789"},
    })
    with in_process_instance(cfg, "tools-0", max_pending_requests=8) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


MESSAGES = [{"role": "user", "content": "Weather in Oslo for 3 days?"}]


def test_named_tool_choice_gives_the_functions_arguments(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME], tool_choice=choice,
                                         max_tokens=80, temperature=0)
    call = out.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and set(args) == {"city", "days"} and 1 <= args["days"] <= 7
    assert out.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME],
                                            tool_choice=choice, max_tokens=80, temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].id
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == args


def test_required_tool_choice_calls_one_of_the_tools(client: openai.OpenAI) -> None:
    for stream in (False, True):
        kwargs: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "tools": [WEATHER, TIME],
                                  "tool_choice": "required", "max_tokens": 120, "temperature": 0}
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            named = [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls]
        else:
            out = client.chat.completions.create(**kwargs)
            finish = [out.choices[0].finish_reason]
            named = [(tc.function.name, json.loads(tc.function.arguments)) for tc in out.choices[0].message.tool_calls]
        assert finish == ["tool_calls"] and named
        for name, args in named:
            assert name in ("get_weather", "get_time") and isinstance(args, dict)


def test_auto_parses_a_hermes_call_whole_and_streamed(client: openai.OpenAI) -> None:
    """The random model's output is forced (guided_regex) into a Qwen-style call; tool_choice auto
    must find it, whole and as streamed deltas, with the text before it as content: the same text both ways."""
    forced = r'Checking\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "Oslo", "days": 2\}\}</tool_call>'
    kwargs: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "tools": [WEATHER], "max_tokens": 120,
                              "temperature": 0, "extra_body": {"guided_regex": forced}}
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Checking. "
    call = whole.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo", "days": 2}
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == whole.message.content
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "get_weather")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(("choice", "output", "finish_reason"), [
    ({"type": "function", "function": {"name": "get_time"}}, '{"zone": "UTC"}', "stop"),
    ("required", '[{"name": "get_time", "parameters": {"zone": "UTC"}}]', "tool_calls"),
    ("required", '[{"name": "get_time", "parameters": {"zo', "length"),  # cut by max_tokens: a partial call
])
def test_a_forced_calls_whole_answer_has_empty_content_as_vllms(choice: object, output: str,
                                                                finish_reason: str) -> None:
    """vLLM's whole answer for a named or required tool choice has `content: ""` (not null) beside its calls."""
    calling = tool_calling_of([WEATHER, TIME], choice)
    assert calling is not None
    builder = ResponseBuilder(endpoint="chat", response_id="chatcmpl-1", model="tiny", detokenize=str,
                              decode=lambda ids: "", tool_calling=calling, text=output,
                              finish_reason="length" if finish_reason == "length" else "stop")
    message = builder.choice(0)["message"]
    assert isinstance(message, dict) and message["content"] == ""
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_time"]  # type: ignore[index,union-attr]
    assert builder.choice(0)["finish_reason"] == finish_reason


def test_a_whole_chat_answer_without_tools_has_an_empty_tool_calls_list_as_vllms() -> None:
    """vLLM's ChatMessage defaults tool_calls to []: every whole chat answer carries the key, tools or not."""
    builder = ResponseBuilder(endpoint="chat", response_id="chatcmpl-1", model="tiny", detokenize=str,
                              decode=lambda ids: "", text="Paris.", finish_reason="stop")
    message = builder.choice(0)["message"]
    assert message == {"role": "assistant", "content": "Paris.", "tool_calls": []}


TWO_CALLS = (r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "Oslo", "days": 2\}\}</tool_call>'
             r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "UTC"\}\}</tool_call>')


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_the_clients_stream_helper_ends_every_streamed_call(client: openai.OpenAI, choice: str) -> None:
    """The openai client's stream helper (`client.chat.completions.stream`) ends a call's arguments (its
    `tool_calls.function.arguments.done` event, which carries `parsed_arguments`) when the next call starts or when
    a later chunk finishes the choice: a chunk carrying a call and the finish at once left the last call unended.
    The finish comes in a chunk of its own after the calls (`delta: {}`), as OpenAI's streams end."""
    extra = {"guided_regex": TWO_CALLS} if choice == "auto" else {}
    with client.chat.completions.stream(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME], tool_choice=choice,
                                        max_tokens=400, temperature=0, extra_body=extra) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls" and calls
    if choice == "auto":
        assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    ended = [e.index for e in events if e.type == "tool_calls.function.arguments.done"]
    assert ended == list(range(len(calls)))
    chunks = [e.chunk.model_dump(exclude_unset=True) for e in events if e.type == "chunk"]
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
    assert len(finishing) == 1 and finishing[0]["choices"][0]["delta"] == {}
    assert finishing[0] is chunks[-1]


DEEP = "[" * 3000  # past Python's recursion limit: json raises RecursionError, not JSONDecodeError


@pytest.mark.parametrize("text", [
    '{"name": "f", "parameters": {"a": ' + DEEP,  # a Llama 3 JSON call, cut
    '<tool_call>{"name": "f", "arguments": {"a": ' + DEEP,  # a Hermes call, cut
    '<tool_call>{"name": "f", "arguments": {"a": ' + DEEP + "]" * 3000 + "}}</tool_call>",  # whole, just deep
    '{"name": "f", "parameters": {"a": ' + DEEP + "]" * 3000 + "}}",
])
def test_output_nested_past_the_recursion_limit_is_no_call(text: str) -> None:
    """A 500 with a traceback before: the parsers caught JSONDecodeError only."""
    assert parse_auto(text) == (text, [])
    calling = tool_calling_of([WEATHER], "auto")
    assert calling is not None
    stream = ToolStream(calling)
    assert stream.delta(text, False) == {} and stream.delta("", True) == {"content": text}


@pytest.mark.parametrize("tail", ["", "]" * 3000 + "}}]"])
def test_a_required_call_nested_past_the_recursion_limit_keeps_its_arguments_as_written(tail: str) -> None:
    calls = parse_required('[{"name": "get_weather", "parameters": {"a": ' + DEEP + tail)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [  # type: ignore[index]
        ("get_weather", '{"a": ' + DEEP + tail)]  # not decodable: as written


# "": a step whose token ends mid-character (or in a partial stop string): its text comes with the next step's
HELD_BACK = ['<tool_call>', '\n{"name": "get_weather", ', '', '"arguments": {"city": "Oslo"}}', '\n</tool_call>']


@pytest.mark.parametrize("choice", ["auto", "required", "none", None])
def test_streamed_token_ids_add_up_to_the_output_when_steps_are_held_back(choice: str | None) -> None:
    """The steps whose text a tool call holds back (or that have no text) sent no chunk, so with return_token_ids
    their ids were never streamed; vLLM sends them in a chunk with an empty delta."""
    calling = tool_calling_of([WEATHER], choice) if choice else None
    builder = ResponseBuilder(endpoint="chat", response_id="chatcmpl-1", model="tiny", detokenize=str,
                              decode=lambda ids: "", tool_calling=calling, return_token_ids=True)
    ids: list[int] = []
    text = ""
    for i, piece in enumerate(HELD_BACK):
        text += piece
        last = i == len(HELD_BACK) - 1
        out = RequestOutput(request_id="r", new_token_ids=[100 + i], new_text=piece,
                            output_token_ids=[100 + j for j in range(i + 1)], text=text, finished=last,
                            finish_reason="stop" if last else None)
        for chunk in builder.chunks(out):
            for c in chunk["choices"]:
                ids += c.get("token_ids", [])
                assert c["delta"] or c["token_ids"] or c["finish_reason"], chunk  # nothing sent for nothing
    assert ids == [100 + i for i in range(len(HELD_BACK))]


def test_an_earlier_calls_arguments_nested_past_the_recursion_limit_are_a_400(client: openai.OpenAI) -> None:
    """A 500 with a traceback before: reading the arguments for the template raised RecursionError."""
    messages: Any = [*MESSAGES, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": DEEP}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, tools=[WEATHER])  # type: ignore[list-item]
    assert caught.value.body["param"] == "messages.1.tool_calls.0.function.arguments", caught.value.body  # type: ignore[index]
    assert "nested" in caught.value.body["message"], caught.value.body  # type: ignore[index]
