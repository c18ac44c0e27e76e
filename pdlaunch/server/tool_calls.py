"""Tool calling: the request's tools and tool_choice, and tool calls parsed out of the output.

- tool_choice "none": the tools still reach the template (vLLM's default, without
  --exclude-tools-when-tool-choice-none) and the output is plain content, never parsed.
- "auto" (the default with tools): the model decides. Its output is parsed for Qwen / Hermes
  style `<tool_call>` blocks or for a Llama 3 JSON call (tool_call_parsers.py). Found calls become
  `tool_calls` with finish_reason "tool_calls"; text before a Hermes call stays content as written.
- "required": structured output forces a JSON array of {"name", "parameters"} of the given
  tools (at least one), as vLLM does; each element is a call. Cut by max_tokens, the answer keeps
  finish_reason "length" and reports the calls written so far, the last one with its arguments as
  far as they got (partial_required_calls), never the raw array as content. Over `tools: []` it is
  plain chat (vLLM's and OpenAI's "none"); any tool_choice but "none" without the tools field is a
  400, as in vLLM.
- Tool parameter schemas are strict (engine/strict_schema.close_objects): a required or
  named call has only the properties its tool declares, unless the schema says
  `"additionalProperties": true`. A required call's grammar holds every tool's parameters, each one's `$ref`s
  pointing into its own definitions there (engine/schema_refs.root_pointers).
- A tool's `function.strict: true` (server/strict_field.py): a forced call of it stays closed when the request opens
  objects, and its `$ref`s are checked whatever tool_choice says. Under auto a strict tool's calls match its schema
  too, as OpenAI guarantees: when any tool is strict, auto's output is constrained by a lazy grammar
  (engine/tool_calls_grammar.py) of the Hermes / Qwen format: free text until the model writes
  `<tool_call>`, then one JSON object {"name": one of the tools, "arguments": that tool's closed parameters} (either
  key first; a tool that is not strict: any JSON object), then `</tool_call>`, then free text or (parallel_tool_calls
  not false) another call. Text that never writes `<tool_call>` is not touched. A Llama 3 JSON call (a bare JSON
  object as the whole answer) is not constrained, strict or not: it has no marker that says a call begins (the
  `<|python_tag|>` is optional), and forcing every answer that starts with "{" into a call would turn JSON content
  into calls; it stays parsed from free text. Each strict tool's schema is compiled once, whichever key comes first.
  Without a strict tool, auto's output is not constrained at all (by the asked grammar alone, when one is asked).
  With a JSON response_format / structured_outputs (json_schema, json_object, json, guided_json) beside strict auto,
  one grammar holds both: the output is that JSON answer (content) or Hermes calls, and no free text (the content is
  the asked JSON); a regex, choice or grammar cannot be joined to calls: a 400 naming it and the strict tool. With
  any asked output beside auto, a JSON answer is content, never read as a Llama 3 JSON call (`answer_asked`).
- a named function: structured output forces that function's parameters schema; the output is
  the arguments (finish_reason stays "stop", as in vLLM).
- A whole answer's content beside named or required calls is "" (vLLM's), beside auto's calls the text
  before them or null.

Streamed, a choice's tool calling is a `ToolStream` (tool_stream.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from pdlaunch.engine.schema_refs import SchemaError, root_pointers
from pdlaunch.engine.strict_schema import close_objects
from pdlaunch.engine.structured_output import CalledTool, StructuredOutput, ToolCallsFormat
from pdlaunch.errors import error_text, json_kind
from pdlaunch.http import JsonObject, JsonValue
from pdlaunch.http.errors import OpenAIError, param_of
from pdlaunch.server.strict_field import check_strict_schema, strict_flag
from pdlaunch.server.tool_call_parsers import HERMES_END, HERMES_START, parse_auto, parse_required, tool_call


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    parameters: JsonObject | None = None

    @field_validator("name")
    @classmethod
    def _a_name(cls, name: str) -> str:
        """"" was taken, and no call the model writes can name it. vLLM takes any other name, so only a blank one is
        refused (OpenAI's own rule is 1 to 64 of letters, digits, `_` and `-`)."""
        if not name.strip():
            raise ValueError("is empty; give the name the model calls the tool by, e.g. \"get_weather\" (letters, "
                             "digits, _ and -, as OpenAI takes)")
        return name


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: ToolFunction

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, data: object) -> object:
        """A tool that is no JSON object is named as such (pydantic's words name this class)."""
        if not isinstance(data, (dict, cls)):
            raise ValueError(f'must be an object (got {json_kind(data)}), e.g. '
                             '{"type": "function", "function": {"name": "...", "parameters": {...}}}')
        return data


@dataclass
class ToolCalling:
    mode: Literal["none", "auto", "required", "named"]
    tools: list[Tool]
    named: str | None = None
    parallel: bool = True  # parallel_tool_calls: false keeps one call
    # response_format / structured_outputs sets the answer's form (auto): a JSON answer is content, never read as a
    # Llama 3 JSON call (`{"name": ...}` is an answer's key as often as a call's); Hermes blocks are still calls
    answer_asked: bool = False

    def template_tools(self) -> list[JsonObject]:
        """The tools as vLLM passes them to the template: every declared field, a missing description or
        parameters as null (a Qwen template renders `"description": null` into the prompt), then the client's
        other fields."""
        return [t.model_dump() for t in self.tools]

    def structured_output(self, answer: StructuredOutput | None = None) -> StructuredOutput | None:
        """The grammar that required / named tool choice imposes, and auto's when a tool is strict (None for auto
        without a strict tool, and for none). `answer`: what response_format / structured_outputs asks for (not
        compiled yet), which auto's strict calls' grammar holds beside them."""
        if self.mode == "auto" and any(_strict(t) for t in self.tools):
            return self._strict_auto(answer)
        if self.mode == "named":  # a schema that does not compile is named where the client wrote it
            return next(p for p, t in zip(self.parameter_grammars(), self.tools) if t.function.name == self.named)
        if self.mode == "required":
            one_of: list[JsonValue] = [{"type": "object",
                       "properties": {"name": {"const": t.function.name},
                                      "parameters": _embedded(t, i, ("items", "anyOf", str(i), "properties",
                                                                     "parameters"))},
                       "required": ["name", "parameters"], "additionalProperties": False}
                       for i, t in enumerate(self.tools)]
            schema: JsonObject = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutput(kind="json", value=json.dumps(schema), field="tools")  # every tool's parameters
        return None

    def _strict_auto(self, answer: StructuredOutput | None) -> StructuredOutput:
        """Auto with a strict tool: Hermes `<tool_call>` blocks (engine/tool_calls_grammar.py), each one of the tools
        by name with, for a strict tool, its closed parameters as arguments (each schema compiled once, whichever key
        comes first); a tool that is not strict takes any JSON object, as unconstrained auto would have parsed. The
        calls come in free text, or beside a JSON `answer` instead of it: then the output is that JSON or calls. An
        answer that is not JSON (a regex, choice or grammar) cannot be joined to calls: a 400 naming both fields."""
        if answer is not None and answer.kind not in ("json", "json_object"):
            strict = f"tools.{next(i for i, t in enumerate(self.tools) if _strict(t))}.function.strict"
            raise OpenAIError(400, f"{answer.field} cannot constrain the output beside {strict}: under tool_choice "
                                   "auto a strict tool's calls are constrained, and only a JSON answer "
                                   "(response_format json_schema / json_object, structured_outputs.json, guided_json) "
                                   f"can be the other choice of that grammar; drop {answer.field} or the tool's "
                                   "strict, or ask for JSON", param=answer.field)
        tools = [CalledTool(name=t.function.name, arguments=g if _strict(t) else None)
                 for g, t in zip(self.parameter_grammars(), self.tools)]
        calls = ToolCallsFormat(tools=tools, start=HERMES_START, end=HERMES_END, parallel=self.parallel, answer=answer)
        return StructuredOutput(kind="tool_calls", value=calls.model_dump_json(), field="tools", strict=True)

    def grammar_parts(self) -> list[StructuredOutput]:
        """The grammars `structured_output`'s is made of, each named where the client wrote it: every tool's
        parameters for required, the strict tools' for auto (none for named: its grammar is its tool's alone)."""
        if self.mode == "required":
            return self.parameter_grammars()
        if self.mode == "auto":
            return [g for g, t in zip(self.parameter_grammars(), self.tools) if _strict(t)]
        return []

    def parameter_grammars(self) -> list[StructuredOutput]:
        """Each tool's parameters schema as a grammar, named where the client wrote it (a required call's grammar
        that does not compile is named by the tool whose parameters do not)."""
        return [StructuredOutput(kind="json", value=json.dumps(_parameters(t)), field=f"tools.{i}.function.parameters",
                                 strict=_strict(t)) for i, t in enumerate(self.tools)]

    def parse(self, text: str) -> tuple[str | None, list[JsonObject]]:
        """(content, tool calls) of a finished output."""
        content, calls = self._parse(text)
        return content, calls if self.parallel else calls[:1]

    def _parse(self, text: str) -> tuple[str | None, list[JsonObject]]:
        # A forced call's content is "" (vLLM's whole answers for named and required), not null as auto's.
        if self.mode == "none":
            return text, []
        if self.mode == "named":
            return "", [tool_call(self.named or "", text)]
        if self.mode == "required":
            return "", parse_required(text)  # cut by max_tokens: never the array as content
        return parse_auto(text, json_calls=not self.answer_asked)


def tool_calling_of(tools: JsonValue, tool_choice: JsonValue, parallel: bool | None = None) -> ToolCalling | None:
    """The request's tool calling (None: plain chat), 400 naming the field when it is malformed."""
    calling = _tool_calling(tools, tool_choice)
    if calling is not None and parallel is False:
        calling.parallel = False
    return calling


_CHOICE_SHAPES = "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}"


def _tool_calling(tools: JsonValue, tool_choice: JsonValue) -> ToolCalling | None:
    if tool_choice is not None and tool_choice not in ("none", "auto", "required") and not isinstance(tool_choice,
                                                                                                   Mapping):
        raise OpenAIError(400, _CHOICE_SHAPES, param="tool_choice")  # named as such, with tools or without
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
            loc = tuple(first.get("loc", ()))
            param = f"tools.{i}" + (f".{param_of(loc)}" if loc else "")
            raise OpenAIError(400, f"{param}: {error_text(first)}", param=param) from None
        if strict_flag((parsed[-1].function.model_extra or {}).get("strict"), f"tools.{i}.function.strict"):
            check_strict_schema(_parameters(parsed[-1]), f"tools.{i}.function.parameters")
    if tool_choice in (None, "auto"):
        return ToolCalling("auto", parsed)
    if tool_choice == "none":
        return ToolCalling("none", parsed)
    if tool_choice == "required":
        return ToolCalling("required", parsed)
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise OpenAIError(400, _CHOICE_SHAPES, param="tool_choice")
    if name not in {t.function.name for t in parsed}:
        raise OpenAIError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice.function.name")
    return ToolCalling("named", parsed, name)



def _embedded(tool: Tool, i: int, at: tuple[str, ...]) -> JsonValue:
    """Tool `i`'s parameters schema where a call's schema holds it (at the path `at` of a required call's array):
    its `$ref`s name its own definitions
    from there (a `#/$defs/x` of its own read from the root of that schema named nothing), or a 400 naming the one
    that names nothing (or the `$id`, `$ref` or nesting past engine/schema_refs.py's bounds). A strict tool's
    parameters come closed (engine/strict_schema.close_objects, its `$ref`s read from its own root): the required
    call's schema is not closed when the request opens objects."""
    where = f"tools.{i}.function.parameters"
    try:
        parameters: JsonValue = _parameters(tool)
        if _strict(tool):
            parameters = close_objects(root_pointers(parameters, where))
        return root_pointers(parameters, where, at)
    except SchemaError as exc:
        raise OpenAIError(400, f"invalid grammar: {exc}", param=exc.field) from None
    except ValueError as exc:  # close_objects: its definitions copied where they are used grow past the bound
        raise OpenAIError(400, f"invalid grammar: {where}: {exc}", param=where) from None


def _strict(tool: Tool) -> bool:
    """The tool's `function.strict` (checked a boolean as the tool was read)."""
    return (tool.function.model_extra or {}).get("strict") is True


def _parameters(tool: Tool) -> JsonObject:
    """A tool without parameters takes none: `{}` (the grammar closes objects with properties)."""
    return tool.function.parameters or {"type": "object", "properties": {}}
