"""The grammar of tool calls under tool_choice auto with a strict tool (server/tool_calls.py), in llguidance's Lark.

Each call is a Hermes / Qwen block: `<tool_call>`, one JSON object {"name": one of the tools, "arguments": that tool's
arguments} (either key first: Qwen writes the name first, Hermes 2 Pro / Hermes 3 the arguments), `</tool_call>`. The
object's framing (braces, keys, separators, the name) is written here in Lark around ONE `%json {...}` per tool's
arguments, which both key orders name: each schema is compiled once (a JSON schema of the whole call would hold every
tool twice, one copy an order, since llguidance writes an object's keys in the order its schema lists them).

The output is either free text with calls in it, or (`answer`: response_format / structured_outputs asked for JSON
beside the tools) that JSON answer alone or calls alone, with no free text: the content is the asked JSON then.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import JsonValue

if TYPE_CHECKING:  # llguidance is imported where a grammar is first needed
    from llguidance import LLTokenizer

# JSON whitespace between tokens (RFC 8259's, as llguidance's whitespace_flexible allows it)
_JSON_SPACE = r"/[ \t\n\r]+/"
_NAME_KEY, _ARGUMENTS_KEY = json.dumps('"name"'), json.dumps('"arguments"')  # Lark literals of the JSON keys


@dataclass(frozen=True)
class AddedTokens:
    """The added tokens of a tokenizer (its special ones and the others it adds, as Qwen's `<tool_call>` or `<think>`):
    llguidance reads every one as special, which a text literal or regex never matches; a grammar names one as
    `<text>` or `<[id]>`."""

    ids: Mapping[str, int]  # text -> token id
    eos: frozenset[int]  # the grammar's EOS: it ends the output, never a token the grammar names

    @staticmethod
    def of(tokenizer: LLTokenizer) -> AddedTokens:
        found = (i for i in range(tokenizer.vocab_size) if tokenizer.is_special_token(i))  # ~4 ms for 49k tokens
        # newer llguidance lists every EOS id (eos_tokens); 1.6 has eos_token alone (pyproject allows >= 1.0)
        eos = getattr(tokenizer, "eos_tokens", None) or [tokenizer.eos_token]
        return AddedTokens({tokenizer.decode_bytes([i]).decode("utf-8", "replace"): i for i in found}, frozenset(eos))


def tool_calls_grammar(tools: Sequence[tuple[str, JsonValue | None]], start: str, end: str, parallel: bool,
                       any_whitespace: bool = False, added: AddedTokens | None = None,
                       answer: JsonValue | None = None) -> str:
    """Text with tool calls in it. `tools`: (name, arguments' schema, None for any JSON object) each, every schema
    already as llguidance is to compile it (`$ref`s resolved, objects closed, within the size bounds).

    Without `answer`: any text until the model writes `start` (a lazy lexeme: it ends at the first `start`), then one
    call, then `end`, then free text or (`parallel`) another call. Where no call has begun any text goes, EOS
    included; once `start` is written the call must follow. Without `parallel` the text after a call may not hold
    `start` again. With `answer` (a JSON schema): the output is that JSON, compiled as the asked grammar alone is
    (compact unless `any_whitespace`, the schema's own `x-guidance` over that), or one call (`parallel`: one or more)
    and nothing else but the newlines around them.

    A call's JSON is written with ", " and ": " (as json.dumps writes it, the form tool-calling models learnt) unless
    `any_whitespace`. Over a tokenizer's `added` tokens (llguidance reads each as special, which text never matches):
    a marker the tokenizer holds as one token (Qwen's `<tool_call>` and `</tool_call>`) may be written as that token
    too, which is how the model writes it, and free text may hold the other added tokens (Qwen 3's `<think>`), as it
    may unconstrained: bytes alone would forbid the tokens the model was trained to write."""
    import llguidance

    if not tools:
        raise ValueError("tool calls' grammar needs at least one tool")
    ids = dict(added.ids) if added is not None else {}
    start_token, end_token = ids.pop(start, None), ids.get(end)
    lark = ["%llguidance {}"]
    if answer is None:
        lark += _free_text_rules(start, start_token, ids, added, parallel)
    else:
        # the asked grammar's defaults (StructuredOutput.grammar)
        guidance: dict[str, JsonValue] = {"whitespace_flexible": any_whitespace}
        lark += [f"start: answer | call{' (SPACE call)*' if parallel else ''} SPACE",
                 "call: opening SPACE body SPACE end",
                 f"opening: {_literal_or_token(start, start_token)}",
                 f"answer: %json {_with_guidance(answer, guidance, own_first=True)}"]
    lark += [f"end: {_literal_or_token(end, end_token)}",
             r"SPACE: /[ \n]{0,2}/"]  # Hermes / Qwen put a newline on each side of the JSON
    lark += _call_rules(tools, any_whitespace)
    return str(llguidance.LLMatcher.grammar_from_lark("\n".join(lark)))


def _literal_or_token(text: str, token: int | None) -> str:
    """`text` written in bytes, or as its added token where the tokenizer has one."""
    return json.dumps(text) + (f" | <[{token}]>" if token is not None else "")


def _free_text_rules(start: str, start_token: int | None, ids: Mapping[str, int], added: AddedTokens | None,
                     parallel: bool) -> list[str]:
    """Free text with calls in it: text without `start` and the tokenizer's other added tokens (`ids`), in turns."""
    others = sorted(i for i in ids.values() if added is None or i not in added.eos)  # `end`'s too: a stray one is text
    texts = f"(REST <[{','.join(map(str, others))}]>)* " if others else ""
    no_start = f"/(?s:.*)/ & ~/(?s:.*){_lark_regex(start)}(?s:.*)/"  # text that does not hold `start`
    # the text up to the first `start` written in bytes, or text without it and then `start`'s token
    by_token = f" | {texts}REST <[{start_token}]>" if start_token is not None else ""
    return [f"start: call{'*' if parallel else '?'} {texts}{'TEXT' if parallel else 'REST'}",
            "call: head SPACE body SPACE end",
            f"head: {texts}text_head{by_token}",
            f"text_head[lazy]: TEXT {json.dumps(start)}",
            r"TEXT: /(?s:.*)/",
            f"REST: {no_start}"]


def _call_rules(tools: Sequence[tuple[str, JsonValue | None]], any_whitespace: bool) -> list[str]:
    """`body`: one call's JSON object, {"name", "arguments"} in either order, of one of `tools`."""
    layout: dict[str, JsonValue] = ({"whitespace_flexible": True} if any_whitespace else
                                    {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    if any_whitespace:
        opened, closed, comma, colon = '"{" WS?', 'WS? "}"', 'WS? "," WS?', 'WS? ":" WS?'
    else:
        opened, closed, comma, colon = '"{"', '"}"', '", "', '": "'
    rules = [f"body: {' | '.join(f'call_{i}' for i in range(len(tools)))}"]
    for i, (name, arguments) in enumerate(tools):
        # the name as json.dumps(..., ensure_ascii=False) writes it, as llguidance writes a const string
        value = json.dumps(json.dumps(name, ensure_ascii=False), ensure_ascii=False)
        args = f"arguments_{i}" if arguments is not None else "any_object"
        name_first = f"{opened} {_NAME_KEY} {colon} {value} {comma} {_ARGUMENTS_KEY} {colon} {args} {closed}"
        arguments_first = f"{opened} {_ARGUMENTS_KEY} {colon} {args} {comma} {_NAME_KEY} {colon} {value} {closed}"
        rules.append(f"call_{i}: {name_first} | {arguments_first}")
        if arguments is not None:  # the tool's arguments compiled once, named by both key orders
            rules.append(f"arguments_{i}: %json {_with_guidance(arguments, layout)}")
    if any(arguments is None for _, arguments in tools):  # a tool that is not strict: any object, as parsed
        rules.append(f"any_object: %json {_with_guidance({'type': 'object'}, layout)}")
    if any_whitespace:
        rules.append(f"WS: {_JSON_SPACE}")
    return rules


def _with_guidance(schema: JsonValue, guidance: dict[str, JsonValue], own_first: bool = False) -> str:
    """`schema` as the JSON text of a `%json {...}` compiled with `guidance` (llguidance's `x-guidance` options):
    over the schema's own (a call's fixed layout) or, `own_first`, under them (as `defaults` are)."""
    if not isinstance(schema, dict):
        schema = {"anyOf": [schema]}  # `true`, `false`: %json takes an object
    own = schema.get("x-guidance")
    options = {**guidance, **own} if own_first and isinstance(own, dict) else guidance
    return json.dumps({**schema, "x-guidance": options})


def _lark_regex(text: str) -> str:
    """`text` matched literally inside a Lark `/.../` regex."""
    return "".join(c if c.isalnum() or c in "_<>" else "\\" + c for c in text)
