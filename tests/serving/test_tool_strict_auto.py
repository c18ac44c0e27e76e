"""A `function.strict: true` tool under tool_choice auto: its calls match its schema (server/tool_calls.py, engine/
tool_calls_grammar.py). Auto was parsed from free text only, so a strict tool's call could break its
schema; now the output is free text until `<tool_call>`, then a call of one of the tools, a strict one's arguments
closed to its parameters.

The grammar over single bytes (what the HTTP side compiles) accepts text and valid calls and refuses calls that
break the schema. Through a real instance's HTTP API: a tiny checkpoint whose tokenizer holds `<tool_call>` and
`</tool_call>` as added tokens, as Qwen's does (two of the random model's last BPE merges give their ids), and a
logit_bias towards `<tool_call>`: the random model then writes the marker first, and with a strict tool the call
that follows matches the schema, whole and streamed; without a strict tool the output is what it was (the same text
as tool_choice none: nothing constrains it). response_format beside strict auto: test_tool_strict_auto_answer.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.engine.grammar_limits import byte_matcher
from pdlaunch.engine.structured_output import GrammarBackend, check, grammar_backend
from pdlaunch.model.demo import ensure_demo_checkpoint
from pdlaunch.model.demo_tokenizer import EOS_TOKEN_ID, VOCAB_SIZE
from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.tool_calls import ToolCalling, tool_calling_of
from tests.serving.helpers import in_process_instance

TIMEOUT = 120.0
A = {"type": "object", "properties": {"a": {"enum": [1]}}, "required": ["a"]}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"]}
HI = [{"role": "user", "content": "Weather in Oslo for 3 days?"}]


def _tool(name: str, parameters: dict[str, Any], strict: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters, **strict}}


def _calling(tools: list[dict[str, Any]], parallel: bool | None = None) -> ToolCalling:
    calling = tool_calling_of(tools, "auto", parallel)
    assert calling is not None and calling.mode == "auto"
    return calling


def _accepts(calling: ToolCalling, text: str) -> bool:
    """Whether the strict-auto grammar of `calling`, over single bytes, lets a model write `text` and stop there."""
    spec = calling.structured_output()
    assert spec is not None and spec.kind == "tool_calls"
    matcher = byte_matcher(check(spec))
    return all(matcher.consume_token(b) for b in text.encode()) and bool(matcher.is_accepting())


def _call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


OSLO, ROME = '{"city": "Oslo", "days": 3}', '{"city": "Rome", "days": 1}'
ACCEPTED = {
    "plain text": "It is sunny in Oslo { not a call }",
    "text, then a call, then text": "Let me look. " + _call("get_weather", OSLO) + " Done.",
    "a call without newlines": f'<tool_call>{{"name": "get_weather", "arguments": {OSLO}}}</tool_call>',
    "the arguments first (Hermes 2 Pro's order)": f'<tool_call>\n{{"arguments": {OSLO}, "name": "get_weather"}}'
                                                  "\n</tool_call>",
    "two calls": _call("get_weather", OSLO) + _call("get_weather", ROME),
    "a Llama 3 JSON call (not constrained)": '{"name": "get_weather", "parameters": {"city": "Reykjavik!!", '
                                             '"days": 99}}',
}
REFUSED = {
    "arguments out of the schema": _call("get_weather", '{"city": "Oslo", "days": 9}'),
    "a string past maxLength": _call("get_weather", '{"city": "Reykjavik", "days": 3}'),
    "a key the strict schema does not name": _call("get_weather", '{"city": "Oslo", "days": 3, "unit": "C"}'),
    "a required key missing": _call("get_weather", '{"city": "Oslo"}'),
    "a tool that is not there": _call("get_time", "{}"),
    "the arguments first, out of the schema": '<tool_call>{"arguments": {"city": "Oslo", "days": 9}, '
                                              '"name": "get_weather"}</tool_call>',
    "not JSON after the marker": "<tool_call> I will call it",
    "parameters for arguments": '<tool_call>{"name": "get_weather", "parameters": {"city": "Oslo", "days": 3}}'
                                "</tool_call>",
    "a call left open": '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}',
}


@pytest.mark.parametrize("case", ACCEPTED)
def test_the_strict_auto_grammar_accepts_text_and_calls_that_match(case: str) -> None:
    assert _accepts(_calling([_tool("get_weather", CITY, {"strict": True})]), ACCEPTED[case])


@pytest.mark.parametrize("case", REFUSED)
def test_the_strict_auto_grammar_refuses_a_call_that_breaks_the_schema(case: str) -> None:
    assert not _accepts(_calling([_tool("get_weather", CITY, {"strict": True})]), REFUSED[case])


def test_only_the_strict_tools_calls_are_constrained_when_tools_mix() -> None:
    calling = _calling([_tool("get_weather", CITY, {"strict": True}), _tool("note", A, {})])
    assert _accepts(calling, _call("note", '{"a": 2, "anything": [true]}'))  # not strict: any JSON object
    assert not _accepts(calling, _call("note", '"not an object"'))
    assert not _accepts(calling, _call("get_weather", '{"city": "Oslo", "days": 9}'))


def test_parallel_tool_calls_false_allows_one_call() -> None:
    one = _call("get_weather", '{"city": "Oslo", "days": 3}')
    calling = _calling([_tool("get_weather", CITY, {"strict": True})], parallel=False)
    assert _accepts(calling, one + " that is all")
    assert not _accepts(calling, one + one)


@pytest.mark.parametrize("strict", [{}, {"strict": False}, {"strict": None}])
def test_auto_without_a_strict_tool_is_not_constrained(strict: dict[str, Any]) -> None:
    assert _calling([_tool("get_weather", CITY, strict)]).structured_output() is None


def test_a_strict_tools_refs_are_read_from_its_own_root() -> None:
    parameters = {"type": "object", "properties": {"day": {"$ref": "#/$defs/day"}}, "required": ["day"],
                  "$defs": {"day": {"enum": ["mon", "tue"]}}}
    calling = _calling([_tool("get_weather", CITY, {"strict": True}), _tool("plan", parameters, {"strict": True})])
    assert _accepts(calling, _call("plan", '{"day": "mon"}'))
    assert not _accepts(calling, _call("plan", '{"day": "sun"}'))
    assert _accepts(calling, '<tool_call>{"arguments": {"day": "tue"}, "name": "plan"}</tool_call>')  # its copy's
    assert not _accepts(calling, '<tool_call>{"arguments": {"day": "sun"}, "name": "plan"}</tool_call>')


@pytest.mark.parametrize(("options", "compact", "spaced"), [({}, False, True),
                                                         ({"disable_any_whitespace": False}, True, True)])
def test_the_calls_json_is_written_as_json_dumps_writes_it_unless_whitespace_is_free(
        options: dict[str, Any], compact: bool, spaced: bool) -> None:
    """The chat request's path: structured_outputs' JSON options apply to the strict auto calls' grammar."""
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": HI, "structured_outputs": options,
                                                    "tools": [_tool("get_weather", CITY, {"strict": True})]})
    spec = request.structured_output()
    assert spec is not None and spec.kind == "tool_calls"
    for text, accepted in (('<tool_call>{"name":"get_weather","arguments":{"city":"Oslo","days":3}}</tool_call>',
                            compact), (_call("get_weather", OSLO), spaced)):
        matcher = byte_matcher(check(spec))
        assert (all(matcher.consume_token(b) for b in text.encode()) and bool(matcher.is_accepting())) == accepted


# ---- through the HTTP API ----

def marker_checkpoint(target: Path, special: bool = False) -> Path:
    """The tiny checkpoint in `target` with `<tool_call>` and `</tool_call>` as added tokens (not special, as Qwen's;
    `special`: special, as Hermes 2 Pro / 3 on Llama 3 hold them), in the ids of its last two BPE merges (nothing
    merges further from them)."""
    source = ensure_demo_checkpoint()
    for file in source.iterdir():
        if file.name == "model.safetensors":
            (target / file.name).symlink_to(file)
        elif file.name != "tokenizer.json":
            shutil.copy(file, target / file.name)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    for marker in ("</tool_call>", "<tool_call>"):
        last_id, last_text = max((i, text) for text, i in vocab.items())
        del vocab[last_text]
        tokenizer["model"]["merges"].pop()
        tokenizer["added_tokens"].insert(0, {"id": last_id, "content": marker, "single_word": False, "lstrip": False,
                                             "rstrip": False, "normalized": False, "special": special})
    (target / "tokenizer.json").write_text(json.dumps(tokenizer))
    return target


def marker_bias(token_ids: list[int]) -> dict[str, float]:
    """`<tool_call>` (its one token) first wherever it may go, then EOS: the random model opens a call, then stops."""
    assert len(token_ids) == 1, token_ids  # the marker is one token
    return {str(token_ids[0]): 100.0, str(EOS_TOKEN_ID): 50.0}


@contextmanager
def marker_instance(checkpoint: Path, name: str) -> Iterator[str]:
    """A colocated in-process instance of a marker checkpoint; yields its address."""
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": str(checkpoint), "max_model_len": 256}, "cache": {"num_gpu_blocks": 128, "block_size": 8},
        "security": {"deployment_secret": "test-deployment-secret-0123456789"},
    })
    with in_process_instance(cfg, name) as (address, _):
        yield address


def served_marker_bias(url: str, checkpoint: Path) -> dict[str, float]:
    """marker_bias of the ids the instance at url tokenizes "<tool_call>" into."""
    return marker_bias(httpx.post(f"{url}/tokenize", timeout=TIMEOUT, json={
        "model": checkpoint.name, "prompt": "<tool_call>", "add_special_tokens": False}).json()["tokens"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return marker_checkpoint(tmp_path_factory.mktemp("tool-markers"))


@pytest.fixture(scope="module")
def url(checkpoint: Path) -> Iterator[str]:
    with marker_instance(checkpoint, "strict-auto-0") as address:
        yield address


@pytest.fixture(scope="module", name="marker_bias")
def _marker_bias(url: str, checkpoint: Path) -> dict[str, float]:
    return served_marker_bias(url, checkpoint)


@pytest.fixture(scope="module")
def backend(checkpoint: Path) -> GrammarBackend:
    return grammar_backend(Tokenizer(checkpoint), VOCAB_SIZE)


@pytest.mark.parametrize(("text", "accepted"), [
    ('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', True),  # both markers as their added tokens
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call><|user|> and more', True),
    ("<|system|> text <|user|></tool_call> text", True),  # other added tokens are free text, as unconstrained
    ('<|user|><tool_call>{"name": "f", "arguments": {"a": 2}}</tool_call>', False),
    ('<tool_call>{"name": "f", "arguments": {"a": 1, "b": 1}}</tool_call>', False),
    ("<tool_call> no call", False),
])
def test_the_markers_as_added_tokens_open_and_close_a_call_that_matches(backend: GrammarBackend, checkpoint: Path,
                                                                        text: str, accepted: bool) -> None:
    """Over a tokenizer holding `<tool_call>` as an added token (Qwen's; llguidance reads it as special, which a text
    literal never matches): the token opens a call as the bytes do, and the tokenizer's other added tokens may be
    written in the free text."""
    tokens = Tokenizer(checkpoint).encode(text, add_special_tokens=False)
    assert {505, 506} & set(tokens) or "<tool_call>" not in text  # the markers came as their tokens
    spec = _calling([_tool("f", A, {"strict": True})]).structured_output()
    assert spec is not None
    matcher = backend.matcher(spec)
    assert (all(matcher.consume_token(t) for t in tokens) and bool(matcher.is_accepting())) == accepted


def _chat(url: str, model: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": HI, "temperature": 0,
                                                             "max_tokens": 48, **body}, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    choice: dict[str, Any] = answer.json()["choices"][0]
    return choice


def _streamed(url: str, model: str, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]], str | None]:
    """(content, tool calls, finish_reason) of a streamed chat answer."""
    content, calls, finish = "", [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=TIMEOUT,
                      json={"model": model, "messages": HI, "temperature": 0, "max_tokens": 48, "stream": True,
                            **body}) as answer:
        assert answer.status_code == 200, answer.read()
        for line in answer.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                content += choice["delta"].get("content") or ""
                calls += choice["delta"].get("tool_calls") or []
                finish = choice["finish_reason"] or finish
    return content, calls, finish


def test_a_strict_tools_auto_call_matches_its_schema_whole_and_streamed(
        url: str, checkpoint: Path, marker_bias: dict[str, float]) -> None:
    body = {"tools": [_tool("f", A, {"strict": True})], "parallel_tool_calls": False, "logit_bias": marker_bias}
    whole = _chat(url, checkpoint.name, body)
    assert whole["finish_reason"] == "tool_calls", whole
    assert not whole["message"]["content"], whole
    [call] = whole["message"]["tool_calls"]
    assert call["function"]["name"] == "f"
    jsonschema.validate(json.loads(call["function"]["arguments"]), {**A, "additionalProperties": False})
    content, calls, finish = _streamed(url, checkpoint.name, body)
    assert (content, finish) == ("", "tool_calls")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("f", json.loads(call["function"]["arguments"]))]


@pytest.mark.parametrize("strict", [{}, {"strict": False}])
def test_auto_without_a_strict_tool_answers_as_before(url: str, checkpoint: Path, marker_bias: dict[str, float],
                                                      strict: dict[str, Any]) -> None:
    """Unconstrained, the biased model writes `<tool_call>` over and over: no call, the text as content, the same text
    tool_choice none gives (which never constrains nor parses)."""
    body = {"tools": [_tool("f", A, strict)], "parallel_tool_calls": False, "logit_bias": marker_bias}
    plain = _chat(url, checkpoint.name, {**body, "tool_choice": "none"})
    assert plain["message"]["content"].startswith("<tool_call><tool_call>"), plain
    whole = _chat(url, checkpoint.name, body)
    assert whole["message"]["content"] == plain["message"]["content"] and not whole["message"]["tool_calls"]
    assert whole["finish_reason"] == plain["finish_reason"] == "length"
    assert _streamed(url, checkpoint.name, body) == (plain["message"]["content"], [], "length")


def test_a_strict_tools_schema_that_does_not_compile_is_a_400_naming_it_under_auto(
        url: str, checkpoint: Path) -> None:
    broken = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}
    answer = httpx.post(f"{url}/v1/chat/completions", timeout=TIMEOUT, json={
        "model": checkpoint.name, "messages": HI, "max_tokens": 4,
        "tools": [_tool("f", A, {"strict": True}), _tool("g", broken, {"strict": True})]})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "tools.1.function.parameters", answer.text


def test_added_tokens_of_an_llguidance_without_eos_tokens() -> None:
    """llguidance 1.6 (which pyproject's llguidance>=1.0 allows) has `eos_token` alone, no `eos_tokens`: every
    grammar's matcher read its added tokens through the latter and failed with AttributeError (found on a GPU host
    with 1.6.1)."""
    from pdlaunch.engine.tool_calls_grammar import AddedTokens

    class OldTokenizer:  # the attributes LLTokenizer 1.6 has of those AddedTokens.of reads
        vocab_size = 4
        eos_token = 3

        def is_special_token(self, token: int) -> bool:
            return token in (0, 3)

        def decode_bytes(self, tokens: list[int]) -> bytes:
            return {0: b"<tool_call>", 3: b"</s>"}.get(tokens[0], b"x")

    added = AddedTokens.of(OldTokenizer())  # type: ignore[arg-type]
    assert added.eos == frozenset({3}) and added.ids == {"<tool_call>": 0, "</s>": 3}


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_a_streams_token_ids_add_up_to_the_whole_answers(url: str, checkpoint: Path, marker_bias: dict[str, float],
                                                         choice: str) -> None:
    """return_token_ids on a stream whose text a tool call holds back: each held-back step still sends its ids (an
    empty delta, as vLLM's), so the chunks' token_ids are the whole answer's; they lacked the held-back steps'."""
    body = {"tools": [_tool("f", A, {"strict": True})], "tool_choice": choice, "logit_bias": marker_bias,
            "return_token_ids": True, "parallel_tool_calls": False}
    whole = _chat(url, checkpoint.name, body)
    assert whole["finish_reason"] in ("tool_calls", "stop") and whole["message"]["tool_calls"], whole
    streamed: list[int] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=TIMEOUT, json={
            "model": checkpoint.name, "messages": HI, "temperature": 0, "max_tokens": 48, "stream": True,
            **body}) as answer:
        assert answer.status_code == 200, answer.read()
        for line in answer.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    streamed += c["token_ids"]
    assert streamed == whole["token_ids"] and len(streamed) > 1, (streamed, whole["token_ids"])
