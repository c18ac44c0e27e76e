"""Tool calling: the request's tools and tool_choice, and tool calls parsed out of the output.

- tool_choice "none": the tools still reach the template (vLLM's default, without
  --exclude-tools-when-tool-choice-none) and the output is plain content, never parsed.
- "auto" (the default with tools): the model decides. Its output is parsed for Qwen / Hermes
  style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, or for a Llama 3 JSON
  call (`{"name": ..., "parameters": {...}}`, optionally after <|python_tag|>, several joined by
  ";"). Found calls become `tool_calls` with finish_reason "tool_calls"; text before a Hermes call
  stays content as written, whitespace included (as vLLM's hermes parser keeps it), so a whole
  answer's content is what a stream of the same output sends.
- "required": structured output forces a JSON array of {"name", "parameters"} of the given
  tools (at least one), as vLLM does; each element is a call. Cut by max_tokens, the answer keeps
  finish_reason "length" and reports the calls written so far, the last one with its arguments as
  far as they got (partial_required_calls), never the raw array as content. Over `tools: []` it is
  plain chat (vLLM's and OpenAI's "none"); any tool_choice but "none" without the tools field is a
  400, as in vLLM.
- Tool parameter schemas are strict (engine/structured_output.close_objects): a required or
  named call has only the properties its tool declares, unless the schema says
  `"additionalProperties": true`.
- a named function: structured output forces that function's parameters schema; the output is
  the arguments (finish_reason stays "stop", as in vLLM).
- A whole answer's content beside named or required calls is "" (vLLM's), beside auto's calls the text
  before them or null.

Streaming (shaped like vLLM's deltas: `delta.tool_calls[i] = {index, id, type, function: {name,
arguments}}`, later ones only `{index, function: {arguments}}`): a named call streams its
arguments as they come; auto streams content until a tool call may start (the text from
`<tool_call>`, or a reply that opens with "{", is held back) and sends the parsed calls when the
request ends; required sends them at the end too.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pdlaunch.engine.structured_output import StructuredOutput
from pdlaunch.errors import error_text
from pdlaunch.http import JsonObject, JsonValue
from pdlaunch.http.errors import OpenAIError, param_of

HERMES_START = "<tool_call>"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_PYTHON_TAG = "<|python_tag|>"


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    parameters: JsonObject | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: ToolFunction


@dataclass
class ToolCalling:
    mode: Literal["none", "auto", "required", "named"]
    tools: list[Tool]
    named: str | None = None
    parallel: bool = True  # parallel_tool_calls: false keeps one call

    def template_tools(self) -> list[JsonObject]:
        """The tools as vLLM passes them to the template: every declared field, a missing description or
        parameters as null (a Qwen template renders `"description": null` into the prompt), then the client's
        other fields."""
        return [t.model_dump() for t in self.tools]

    def structured_output(self) -> StructuredOutput | None:
        """The grammar that required / named tool choice imposes (None for auto)."""
        if self.mode == "named":  # a schema that does not compile is named where the client wrote it
            return next(p for p, t in zip(self.parameter_grammars(), self.tools) if t.function.name == self.named)
        if self.mode == "required":
            one_of: list[JsonValue] = [{"type": "object",
                       "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)},
                       "required": ["name", "parameters"], "additionalProperties": False} for t in self.tools]
            schema: JsonObject = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutput(kind="json", value=json.dumps(schema), field="tools")  # every tool's parameters
        return None

    def parameter_grammars(self) -> list[StructuredOutput]:
        """Each tool's parameters schema as a grammar, named where the client wrote it (a required call's grammar
        that does not compile is named by the tool whose parameters do not)."""
        return [StructuredOutput(kind="json", value=json.dumps(_parameters(t)), field=f"tools.{i}.function.parameters")
                for i, t in enumerate(self.tools)]

    def parse(self, text: str) -> tuple[str | None, list[JsonObject]]:
        """(content, tool calls) of a finished output."""
        content, calls = self._parse(text)
        return content, calls if self.parallel else calls[:1]

    def _parse(self, text: str) -> tuple[str | None, list[JsonObject]]:
        # A forced call's content is "" (vLLM's whole answers for named and required), not null as auto's.
        if self.mode == "none":
            return text, []
        if self.mode == "named":
            return "", [_call(self.named or "", text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                return "", partial_required_calls(text)  # cut by max_tokens: never the array as content
            return "", [_call(i["name"], _arguments_json(i.get("parameters", {})))
                        for i in items if isinstance(i, dict)]
        return parse_auto(text)


def tool_calling_of(tools: JsonValue, tool_choice: JsonValue, parallel: bool | None = None) -> ToolCalling | None:
    """The request's tool calling (None: plain chat), 400 naming the field when it is malformed."""
    calling = _tool_calling(tools, tool_choice)
    if calling is not None and parallel is False:
        calling.parallel = False
    return calling


def _tool_calling(tools: JsonValue, tool_choice: JsonValue) -> ToolCalling | None:
    # As vLLM's check_tool_usage: a tool_choice but "none" needs the tools field, and "required" over an empty
    # list is plain chat ("none" without tools, as OpenAI answers it).
    if tools is None:
        if tool_choice not in (None, "none"):
            raise OpenAIError(400, "tool_choice needs tools: send the tools it chooses from, or leave it out",
                              param="tool_choice")
        return None
    if tools == [] and tool_choice in (None, "none", "auto", "required"):
        return None  # a named function is not among no tools: refused below
    if not isinstance(tools, list):
        raise OpenAIError(400, "tools must be a list of function tools", param="tools")
    parsed = []
    for i, tool in enumerate(tools):
        try:
            parsed.append(Tool.model_validate(tool))
        except ValidationError as exc:
            first = exc.errors()[0]
            param = f"tools.{i}." + param_of(first.get("loc", ()))
            raise OpenAIError(400, f"{param}: {error_text(first)}", param=param) from None
    if tool_choice in (None, "auto"):
        return ToolCalling("auto", parsed)
    if tool_choice == "none":
        return ToolCalling("none", parsed)
    if tool_choice == "required":
        return ToolCalling("required", parsed)
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise OpenAIError(400, "tool_choice must be none, auto, required or {\"type\": \"function\", "
                               "\"function\": {\"name\": ...}}", param="tool_choice")
    if name not in {t.function.name for t in parsed}:
        raise OpenAIError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice.function.name")
    return ToolCalling("named", parsed, name)


def parse_auto(text: str) -> tuple[str | None, list[JsonObject]]:
    """Hermes / Qwen blocks, else a Llama 3 JSON call; (text, []) when neither parses."""
    start = text.find(HERMES_START)
    if start >= 0:
        calls = _calls_of(_HERMES.findall(text[start:]))
        # As written, whitespace kept (vLLM's hermes parser), so it is what a stream sent before the call.
        return (text[:start] or None, calls) if calls else (text, [])
    stripped = text.strip().removeprefix(_PYTHON_TAG).strip()
    if not stripped.startswith("{"):
        return text, []
    calls = _llama_calls(stripped)
    return (None, calls) if calls is not None else (text, [])


def _llama_calls(text: str) -> list[JsonObject] | None:
    """The calls of Llama 3's `{...}; {...}`, or None when something else is there. Each object is decoded whole,
    as vLLM's parser does, so a ";" inside an argument (`"SELECT 1; SELECT 2"`) does not split its call."""
    decoder, pos = json.JSONDecoder(), 0
    calls: list[JsonObject] = []
    while pos < len(text):
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        call = _call_of(item)
        if call is None:
            return None
        calls.append(call)
        while pos < len(text) and (text[pos] == ";" or text[pos].isspace()):
            pos += 1
    return calls


_PARTIAL_CALL = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"parameters"\s*:\s*', re.S)


def partial_required_calls(text: str) -> list[JsonObject]:
    """The calls of a required tool choice's array that max_tokens cut: every whole call, then the one being
    written once its name is whole, with its arguments as far as they got (not JSON yet), as vLLM streams
    them. The grammar wrote `[{"name": ..., "parameters": ...}, ...]` in that order."""
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        return []
    calls, pos = [], start + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            calls.append(_call(item["name"], _arguments_json(item.get("parameters", {}))))
    cut = _PARTIAL_CALL.match(text, pos)
    if cut is not None:
        arguments = text[cut.end():]
        try:  # the parameters are whole and only the call's closing brace is missing
            arguments = arguments[:decoder.raw_decode(arguments)[1]]
        except json.JSONDecodeError:
            pass
        calls.append(_call(json.loads(cut.group(1)), arguments))
    return calls


def _calls_of(bodies: list[str]) -> list[JsonObject] | None:
    """The call in every JSON body, or None when one of them is not a call."""
    calls: list[JsonObject] = []
    for body in bodies:
        try:
            call = _call_of(json.loads(body))
        except json.JSONDecodeError:
            return None
        if call is None:
            return None
        calls.append(call)
    return calls


def _call_of(item: object) -> JsonObject | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    return _call(item["name"], arguments if isinstance(arguments, str) else _arguments_json(arguments))


def _arguments_json(arguments: object) -> str:
    """Non-ASCII text as it is ("Zürich", not "Z\\u00fcrich"), as vLLM's parsers write arguments."""
    return json.dumps(arguments, ensure_ascii=False)


def _call(name: str, arguments: str) -> JsonObject:
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _parameters(tool: Tool) -> JsonObject:
    """A tool without parameters takes none: `{}` (the grammar closes objects with properties)."""
    return tool.function.parameters or {"type": "object", "properties": {}}


@dataclass
class ToolStream:
    """The streamed view of one choice's tool calling: what each chunk's delta carries."""

    calling: ToolCalling
    text: str = ""
    sent: int = 0  # characters of `text` sent as content (auto) or arguments (named)
    call_id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")

    opened: bool = False  # named: the first delta (id, type, name) went out

    def delta(self, new_text: str, finished: bool) -> JsonObject:
        self.text += new_text
        if self.calling.mode == "named":
            piece, self.sent = self.text[self.sent:], len(self.text)
            if self.opened:
                return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} if piece else {}
            self.opened = True
            return {"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                    "function": {"name": self.calling.named, "arguments": piece}}]}
        content = ""
        if self.calling.mode == "none":
            self.sent = len(self.text)
            return {"content": new_text} if new_text or finished else {}
        if self.calling.mode == "auto":
            safe = self._content_end(finished)
            content = self.text[self.sent:safe] if safe > self.sent else ""
            self.sent = max(self.sent, safe)
        calls: list[JsonObject] = []
        if finished:
            calls = self.calling.parse(self.text)[1]
            if not calls and self.calling.mode == "auto" and len(self.text) > self.sent:
                content += self.text[self.sent:]
                self.sent = len(self.text)
        delta: JsonObject = {"content": content} if content else {}
        if calls:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
        return delta

    def _content_end(self, finished: bool) -> int:
        """How far the text is surely content: up to a tool call's possible start."""
        start = self.text.find(HERMES_START)
        if start >= 0:
            return start
        if self.text.lstrip().startswith(("{", _PYTHON_TAG)):
            return 0
        if finished:
            return len(self.text)
        if _PYTHON_TAG.startswith(self.text.lstrip()):  # the tag may be arriving in pieces
            return 0
        for n in range(min(len(HERMES_START) - 1, len(self.text)), 0, -1):  # a marker may be arriving
            if HERMES_START.startswith(self.text[-n:]):
                return len(self.text) - n
        return len(self.text) if self.text.strip() else 0
