"""What a request may ask llguidance to compile: past a bound below, a 400 naming where and the bound, before the
compile spends seconds of a server thread (and as many again on the engine's grammar thread).

Measured with llguidance 1.9.1 on this project's 2-core host (CPU seconds of `check`, structured_output.py):
- An object's keys (its `properties`, and the `required` names it does not list): llguidance orders them through a
  cache keyed by the slice of keys left, so an object compiles in time that grows as the square of its keys: 4,000
  optional keys 1.3 s, 13,000 (a 400 KB schema) ~7 s, 15-30 s of wall time on a loaded host. Past ~500 optional
  keys in a row llguidance refuses the object anyway (an Earley row of 4 items a key; at most 2,000 items).
  At most MAX_OBJECT_PROPERTIES an object.
- Keys in all: 16,000 in 8 objects of 2,000 took 2.8 s, and were past llguidance's 65,525 grammar symbols (a panic
  where a matcher is built). At most MAX_SCHEMA_PROPERTIES.
- `patternProperties`: llguidance checks every pair of an object's patterns for overlap, up to ~1 ms a pair: 100
  patterns took 4.7 s (a 4.6 KB schema), 300 short ones 9 s. At most MAX_OBJECT_PATTERNS an object and
  MAX_SCHEMA_PATTERNS in all (4 objects at the bound: ~0.5 s).
- Grammar and regex text: a Lark grammar costs ~4 us of CPU a character (50,000 alternatives, 690 KB: 2.6 s). At most
  MAX_GRAMMAR_CHARS. A grammar may hold JSON schemas (`%json {...}`, llguidance's Lark): each is bounded as a
  request's schema is (300 patternProperties in 10 KB of grammar took 4.5 s).
Not bounded here, measured cheap or bounded by llguidance: enums (50,000 values 0.5 s; ~100,000 pass its lexer's fuel,
an error), anyOf (2,000 object options 0.3 s; 4,000 pass its row limit), guided_choice (1,999 choices of 4 KB 0.2 s;
2,000 pass the row limit), array and string lengths and numeric ranges (compiled lazily), nesting (64 levels:
schema_refs.MAX_DEPTH), subschemas (50,000: "schema too large"), and allOf / anyOf products (the same count; an
allOf of 6 anyOfs of 4 objects, 2 KB, is past 65,525 symbols: refused where the check builds it, in 0.8 s).

What a realistic schema holds, the yardstick of the bounds: OpenAI's structured outputs take at most 5,000 properties
in all, 10 levels of nesting, 1,000 enum values and no patternProperties; FHIR's schema (fhir.schema.json, 2.1 MB,
626 definitions), the largest in common use, has 8,502 properties, 253 in its largest object (ElementDefinition), no
patternProperties, and checks in ~0.8 s; OpenAPI 3.0's own schema gives ~30 of its objects one `^x-` pattern each; a
whole Python 3 grammar in Lark (lark's python.lark) is 10.6 KB.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from pydantic import JsonValue

from pdlaunch.engine.schema_refs import MAX_DEPTH, Path, SchemaError, subschemas

MAX_OBJECT_PROPERTIES = 1_000  # 4x FHIR's largest object
MAX_SCHEMA_PROPERTIES = 10_000  # 2x OpenAI's bound, FHIR's 8,502 with room
MAX_OBJECT_PATTERNS = 16
MAX_SCHEMA_PATTERNS = 64
MAX_GRAMMAR_CHARS = 100_000  # ~10x a whole Python grammar
_JSON_IN_LARK = re.compile(r"%json\s*")


def check_schema_size(schema: JsonValue, where: str) -> None:
    """SchemaError naming the first object of `schema` (as llguidance will compile it: `$ref`s resolved, objects
    closed) with more keys or patternProperties than an object may have, or the schema when all its objects together
    have more than a schema may. `where`: the request field the schema came from. Iterative: no recursion, one
    iterator a level."""
    path: list[str] = []
    pending: list[tuple[Iterator[tuple[Path, JsonValue]], int]] = [(iter([((), schema)]), 0)]
    totals = {"properties": 0, "patternProperties": 0}
    while pending:
        children, depth = pending[-1]
        step = next(children, None)
        if step is None:
            pending.pop()
            continue
        relative, node = step
        del path[depth:]
        path.extend(relative)
        if isinstance(node, dict):
            _count(node, path, where, totals)
            pending.append((subschemas(node), len(path)))


def _count(node: dict[str, JsonValue], path: list[str], where: str, totals: dict[str, int]) -> None:
    properties = node.get("properties")
    names = set(properties) if isinstance(properties, dict) else set()
    required = node.get("required")
    names.update(name for name in (required if isinstance(required, list) else ()) if isinstance(name, str))
    patterns = node.get("patternProperties")
    bounds = (("properties", len(names), MAX_OBJECT_PROPERTIES, MAX_SCHEMA_PROPERTIES,
               "llguidance compiles an object in time that grows as the square of its keys"),
              ("patternProperties", len(patterns) if isinstance(patterns, dict) else 0, MAX_OBJECT_PATTERNS,
               MAX_SCHEMA_PATTERNS, "llguidance compares every pair of an object's patterns, up to ~1 ms a pair"))
    for keyword, count, per_object, per_schema, why in bounds:
        if count > per_object:
            raise SchemaError(f"{count:,} {keyword} in one object; at most {per_object:,} ({why})",
                              field=".".join((where, *path, keyword)))
        totals[keyword] += count
        if totals[keyword] > per_schema:
            raise SchemaError(f"the schema's objects have more than {per_schema:,} {keyword} in all; send a smaller "
                              "schema", field=where)


def check_text_size(text: str) -> None:
    """ValueError when a regex or grammar is longer than MAX_GRAMMAR_CHARS."""
    if len(text) > MAX_GRAMMAR_CHARS:
        raise ValueError(f"{len(text):,} characters; a regex or grammar may have at most {MAX_GRAMMAR_CHARS:,} "
                         "(llguidance compiles one in ~4 us a character, and recurses once for each rule a chain of "
                         "them reaches)")


def check_grammar_size(text: str, field: str) -> None:
    """check_text_size, and check_schema_size for each JSON schema a Lark grammar holds (`%json {...}`; one in a
    comment or a string is bounded too: it costs nothing to count). SchemaError names `field`.%json."""
    check_text_size(text)
    decoder = json.JSONDecoder()
    for found in _JSON_IN_LARK.finditer(text):
        try:
            schema, _ = decoder.raw_decode(text, found.end())
        except ValueError:
            continue  # not JSON there: llguidance says what is wrong, if anything is
        except RecursionError:  # nested past Python's parser, far past what a schema nests
            raise SchemaError(f"the schema nests deeper than {MAX_DEPTH} levels", field=f"{field}.%json") from None
        check_schema_size(schema, f"{field}.%json")
