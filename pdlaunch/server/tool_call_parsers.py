"""Tool calls read out of a model's output text, in the formats vLLM's parsers read.

- Qwen / Hermes style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (`parse_auto`): the
  text before the first block stays content as written, whitespace included (as vLLM's hermes parser keeps
  it), so a whole answer's content is what a stream of the same output sends.
- A Llama 3 JSON call (`{"name": ..., "parameters": {...}}`, optionally after <|python_tag|>, several joined
  by ";"), when no Hermes block is there (`parse_auto`).
- The JSON array of {"name", "parameters"} that a required tool choice's grammar writes (`parse_required`),
  cut or whole.

Which format a call takes is read from the output, not set per model. A strict tool under auto constrains the
Hermes format only (server/tool_calls.py: the text from `HERMES_START` to `HERMES_END` must be a call of the
tools); a Llama 3 JSON call is never constrained, strict or not: nothing marks where it begins (the tag is
optional), and forcing every answer that opens with "{" into a call would turn JSON content into calls. When the
request asks for the answer's form (response_format / structured_outputs), a JSON answer is that answer: no Llama 3
call is read out of it (`parse_auto(..., json_calls=False)`).

Output nested deeper than the decoder can recurse (a model repeating "[", cut by max_tokens) is no JSON to these
parsers (`NOT_JSON`), as a body that does not decode: not a call, or the cut call's arguments as written.

Every call comes out as OpenAI's `{"id", "type": "function", "function": {"name", "arguments"}}`, its
arguments a JSON string.
"""

from __future__ import annotations

import json
import re
import uuid

from pdlaunch.http import JsonObject

HERMES_START = "<tool_call>"
HERMES_END = "</tool_call>"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
PYTHON_TAG = "<|python_tag|>"
# What decoding (or re-encoding) the output may raise: RecursionError for JSON nested past Python's recursion limit
NOT_JSON = (json.JSONDecodeError, RecursionError)


def parse_auto(text: str, json_calls: bool = True) -> tuple[str | None, list[JsonObject]]:
    """Hermes / Qwen blocks, else (`json_calls`) a Llama 3 JSON call; (text, []) when neither parses."""
    start = text.find(HERMES_START)
    if start >= 0:
        calls = _calls_of(_HERMES.findall(text[start:]))
        # As written, whitespace kept (vLLM's hermes parser), so it is what a stream sent before the call.
        return (text[:start] or None, calls) if calls else (text, [])
    if not json_calls:
        return text, []
    stripped = text.strip().removeprefix(PYTHON_TAG).strip()
    calls = _llama_calls(stripped) if stripped.startswith("{") else None
    # No call: the text as decoded, as vLLM's llama3_json parser gives it back. Its opening `<|python_tag|>` is a
    # special token, there only when the client kept special tokens (skip_special_tokens false) or the checkpoint's
    # special tool-call markers did (server/choices.py): then the client sees it, as from vLLM.
    return (None, calls) if calls is not None else (text, [])


def parse_required(text: str) -> list[JsonObject]:
    """The calls of a required tool choice's array; one that max_tokens cut gives what it wrote so far
    (`partial_required_calls`), never the array as content."""
    try:
        items = json.loads(text)
        return [tool_call(i["name"], arguments_json(i.get("parameters", {}))) for i in items if isinstance(i, dict)]
    except NOT_JSON:
        return partial_required_calls(text)


def _llama_calls(text: str) -> list[JsonObject] | None:
    """The calls of Llama 3's `{...}; {...}`, or None when something else is there. Each object is decoded whole,
    as vLLM's parser does, so a ";" inside an argument (`"SELECT 1; SELECT 2"`) does not split its call."""
    decoder, pos = json.JSONDecoder(), 0
    calls: list[JsonObject] = []
    while pos < len(text):
        try:
            item, pos = decoder.raw_decode(text, pos)
            call = _call_of(item)
        except NOT_JSON:
            return None
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
            item, end = decoder.raw_decode(text, pos)
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                calls.append(tool_call(item["name"], arguments_json(item.get("parameters", {}))))
        except NOT_JSON:
            break
        pos = end
    cut = _PARTIAL_CALL.match(text, pos)
    if cut is not None:
        arguments = text[cut.end():]
        try:  # the parameters are whole and only the call's closing brace is missing
            arguments = arguments[:decoder.raw_decode(arguments)[1]]
        except NOT_JSON:
            pass
        calls.append(tool_call(json.loads(cut.group(1)), arguments))
    return calls


def _calls_of(bodies: list[str]) -> list[JsonObject] | None:
    """The call in every JSON body, or None when one of them is not a call."""
    calls: list[JsonObject] = []
    for body in bodies:
        try:
            call = _call_of(json.loads(body))
        except NOT_JSON:
            return None
        if call is None:
            return None
        calls.append(call)
    return calls


def _call_of(item: object) -> JsonObject | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    return tool_call(item["name"], arguments if isinstance(arguments, str) else arguments_json(arguments))


def arguments_json(arguments: object) -> str:
    """Non-ASCII text as it is ("Zürich", not "Z\\u00fcrich"), as vLLM's parsers write arguments."""
    return json.dumps(arguments, ensure_ascii=False)


def tool_call(name: str, arguments: str) -> JsonObject:
    """One call as OpenAI's tool_calls entry, under a fresh id."""
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": arguments}}
