"""OpenAI's `strict` switch of a JSON schema: `response_format.json_schema.strict` and a tool's `function.strict`.

vLLM accepts both and does nothing with them (its guidance backend closes objects only when the server is started
with `disable_additional_properties`). Here `strict: true` is OpenAI's strict mode as far as a grammar holds it:

- every object of that schema is closed (engine/strict_schema.close_objects) whatever the request's
  `structured_outputs.disable_additional_properties` says: strict is the schema's own word, as an explicit
  `"additionalProperties": false` on each object is, which that option does not open either;
- a schema that OpenAI's strict mode refuses for what strict means is a 400 whose param is the place in it
  (`response_format.json_schema.schema.properties.a.required`): a property its object's `required` does not list
  (OpenAI: every field is required; an optional one is written nullable), an `additionalProperties` or
  `unevaluatedProperties` other than false (strict closes every object), or an object that names no `properties`
  and leaves `additionalProperties` out (closed it could only be `{}`; OpenAI refuses it too).

The rest of JSON Schema is served as without strict. `strict: false`, null or absent: the schema is served as any
other (closed unless the request opens objects). Another value is a 400 naming the field.
"""

from __future__ import annotations

from collections.abc import Iterator

from pdlaunch.engine.schema_refs import Path, SchemaRefError, root_pointers, subschemas
from pdlaunch.http import JsonValue
from pdlaunch.http.errors import OpenAIError

_OPEN_KEYWORDS = ("additionalProperties", "unevaluatedProperties")
# Keywords that give an object its keys elsewhere: one with them and no `properties` of its own names some.
_KEYS_ELSEWHERE = ("allOf", "anyOf", "oneOf", "$ref")
_HOW_TO_OPT_OUT = "or send strict: false"


def strict_flag(value: JsonValue, param: str) -> bool:
    """The `strict` field's value: True only for JSON true; a value other than a boolean or null is a 400."""
    if value is not None and not isinstance(value, bool):
        raise OpenAIError(400, f"{param} must be true or false", param=param)
    return value is True


def check_strict_schema(schema: JsonValue, param: str) -> None:
    """A 400 naming the first place where `schema` (the request field `param`) breaks a rule of strict mode; one
    naming a `$ref` that names nothing comes first, as without strict (the schema itself is broken)."""
    try:
        root_pointers(schema, param)
    except SchemaRefError as exc:
        raise OpenAIError(400, f"invalid grammar: {exc}", param=exc.field) from None
    for path, problem in _problems(schema, ()):
        where = ".".join((param, *path))
        raise OpenAIError(400, f"{where}: strict: true {problem}", param=where)


def _problems(schema: JsonValue, path: Path) -> Iterator[tuple[Path, str]]:
    """(path, what is wrong) of each strict-mode problem of `schema` and its subschemas, outermost first."""
    if not isinstance(schema, dict):
        return
    for keyword in _OPEN_KEYWORDS:
        if keyword in schema and schema[keyword] is not False:
            yield (*path, keyword), (f"closes every object: {keyword} must be false or left out; "
                                     f"{_HOW_TO_OPT_OUT} to keep this object open")
    properties = schema.get("properties")
    if isinstance(properties, dict):
        required = schema.get("required")
        listed = set(required) if isinstance(required, list) and all(isinstance(r, str) for r in required) else set()
        missing = [key for key in properties if key not in listed]
        if missing:
            yield (*path, "required"), ("needs every property listed in `required`, which lacks "
                                        f"{', '.join(map(repr, missing))} (a field that may be left empty is "
                                        "written required and nullable in strict mode, e.g. \"type\": [\"string\", "
                                        f"\"null\"]); {_HOW_TO_OPT_OUT}")
    elif _is_object(schema) and not any(key in schema for key in (*_OPEN_KEYWORDS, *_KEYS_ELSEWHERE)):
        yield path, ("closes every object to the keys its `properties` name, and this object names none: list "
                     "them, or write \"additionalProperties\": false if it is meant to be empty; "
                     f"{_HOW_TO_OPT_OUT} to allow any object")
    for sub_path, sub in subschemas(schema):
        yield from _problems(sub, (*path, *sub_path))


def _is_object(schema: dict[str, JsonValue]) -> bool:
    kind = schema.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind)
