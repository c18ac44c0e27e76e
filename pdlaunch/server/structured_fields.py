"""The request fields that ask for structured output, as one `StructuredOutput`.

OpenAI's `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema":
{"schema": ...}}), vLLM's `structured_outputs` ({json | regex | choice | grammar | json_object})
and its older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`. At most one
may ask; options we do not implement (structural tags, whitespace patterns, a backend choice)
are refused with a 400 naming them. JSON schemas are strict: an object schema with `properties` and
no `additionalProperties` is closed (engine/strict_schema.close_objects) unless the request sends
`structured_outputs: {"disable_additional_properties": false}`; JSON is compact unless it sends
`structured_outputs: {"disable_any_whitespace": false}`. Both options apply to whichever field asked for the JSON
(vLLM folds response_format into structured_outputs), a forced tool call's included (`json_options`), but
`response_format.json_schema.strict: true` keeps its schema closed (server/strict_field.py). A `$ref` that points to
nothing in its schema is a 400 whose param is its path
(`response_format.json_schema.schema.properties.a.$ref`; engine/schema_refs.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from pdlaunch.engine.schema_refs import SchemaError
from pdlaunch.engine.structured_output import StructuredOutput, check
from pdlaunch.http import JsonObject, JsonValue
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.strict_field import strict_flag

# structured_outputs keys that ask for something we do not do (when truthy).
_UNSUPPORTED_OPTIONS = ("structural_tag", "whitespace_pattern")
_KINDS = ("json", "regex", "choice", "grammar")
# structured_outputs keys that are switches (disable_additional_properties: json_options checks it).
_SWITCHES = ("json_object", "disable_fallback", "disable_any_whitespace")
# Every key vLLM's StructuredOutputsParams takes: another one (a typo, `jsn`) asked for nothing, and the output
# came back unconstrained with a 200.
_OPTIONS = (*_KINDS, *_SWITCHES, "disable_additional_properties", *_UNSUPPORTED_OPTIONS)


def structured_output_of(response_format: JsonValue, structured_outputs: JsonValue,
                         guided: JsonObject) -> StructuredOutput | None:
    """The one structured-output request of a body (checked: the grammar compiles), or None."""
    asked = asked_output_of(response_format, structured_outputs, guided)
    return checked(asked) if asked is not None else None


def asked_output_of(response_format: JsonValue, structured_outputs: JsonValue,
                    guided: JsonObject) -> StructuredOutput | None:
    """The one structured-output request of a body, its JSON options applied, not compiled yet (a 400 when its
    fields are malformed), or None."""
    found: list[StructuredOutput] = []
    if response_format is not None:
        spec = _from_response_format(response_format)
        if spec is not None:
            found.append(spec)
    if structured_outputs is not None:
        found.extend(_from_structured_outputs(structured_outputs))
    for kind in _KINDS:
        value = guided.get(kind)
        if value is not None:
            found.append(_spec(kind, value, f"guided_{kind}"))
    if len(found) > 1:
        raise OpenAIError(400, f"{found[1].field}: only one structured output may be asked for (also got "
                               f"{found[0].field})", param=found[1].field)
    if not found:
        return None
    return found[0].model_copy(update=json_options(structured_outputs))  # whichever field asked for it


def checked(spec: StructuredOutput, parts: Sequence[StructuredOutput] = ()) -> StructuredOutput:
    """`spec` once its grammar compiles, else a 400 naming the first of `parts` (the grammars it is made of, each
    named where the client wrote it) that does not compile, or `spec`'s field."""
    try:
        check(spec)
    except ValueError as exc:
        for part in parts:
            try:
                check(part)
            except ValueError as part_exc:
                raise OpenAIError(400, f"invalid grammar: {part_exc}", param=_param(part_exc, part)) from None
        raise OpenAIError(400, f"invalid grammar: {exc}", param=_param(exc, spec)) from None
    return spec


def _param(error: ValueError, spec: StructuredOutput) -> str:
    """The request field an error of `spec`'s grammar names: a `$ref` that points nowhere names its own path."""
    return error.field or spec.field if isinstance(error, SchemaError) else spec.field


def _from_response_format(value: JsonValue) -> StructuredOutput | None:
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        raise OpenAIError(400, "response_format must be an object with a `type`", param="response_format.type")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(kind="json_object", value="", field="response_format")
    if kind == "json_schema":
        inner = value.get("json_schema")
        inner = inner if isinstance(inner, Mapping) else {}
        schema = inner.get("schema")
        if not isinstance(schema, Mapping):
            raise OpenAIError(400, "response_format json_schema needs json_schema.schema (an object)",
                              param="response_format.json_schema.schema")
        field = "response_format.json_schema.schema"
        strict = strict_flag(inner.get("strict"), "response_format.json_schema.strict")
        return StructuredOutput(kind="json", value=json.dumps(schema), field=field, strict=strict)
    raise OpenAIError(400, f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                      param="response_format.type")


def _from_structured_outputs(value: JsonValue) -> list[StructuredOutput]:
    if not isinstance(value, Mapping):
        raise OpenAIError(400, "structured_outputs must be an object", param="structured_outputs")
    unknown = next((key for key in value if key not in _OPTIONS), None)
    if unknown is not None:
        raise OpenAIError(400, f"structured_outputs.{unknown} is not an option of structured_outputs (it takes "
                               f"{', '.join(_OPTIONS)})", param=f"structured_outputs.{unknown}")
    switch = next((key for key in _SWITCHES if value.get(key) is not None and not isinstance(value[key], bool)), None)
    if switch is not None:
        raise OpenAIError(400, f"structured_outputs.{switch} must be true or false",
                          param=f"structured_outputs.{switch}")
    for option in _UNSUPPORTED_OPTIONS:
        if value.get(option):
            raise OpenAIError(400, f"structured_outputs.{option} is not supported",
                              param=f"structured_outputs.{option}")
    found = [_spec(kind, value[kind], f"structured_outputs.{kind}") for kind in _KINDS if value.get(kind) is not None]
    if value.get("json_object"):
        found.append(StructuredOutput(kind="json_object", value="", field="structured_outputs.json_object"))
    # disable_fallback asks that no other backend be tried: there is only one.
    return found


def json_options(structured_outputs: JsonValue) -> dict[str, bool]:
    """The StructuredOutput fields that structured_outputs' JSON options set, for the constraint of any field:
    disable_additional_properties: false opens the JSON schemas' objects (vLLM's guidance option; true, the
    default here, closes the ones without additionalProperties: engine/strict_schema.close_objects), and
    disable_any_whitespace: false allows whitespace between JSON tokens (off by default, as with true)."""
    if not isinstance(structured_outputs, Mapping):
        return {}
    options = {"disable_additional_properties": "open_objects", "disable_any_whitespace": "any_whitespace"}
    for option in options:
        value = structured_outputs.get(option)
        if value is not None and not isinstance(value, bool):
            raise OpenAIError(400, f"structured_outputs.{option} must be true or false",
                              param=f"structured_outputs.{option}")
    return {field: True for option, field in options.items() if structured_outputs.get(option) is False}


def _spec(kind: str, value: JsonValue, field: str) -> StructuredOutput:
    if kind == "json" and isinstance(value, (Mapping, str)):
        text = value if isinstance(value, str) else json.dumps(value)
        return StructuredOutput(kind="json", value=text, field=field)
    if kind == "choice" and isinstance(value, list) and value and all(isinstance(c, str) for c in value):
        return StructuredOutput(kind="choice", value=json.dumps(value), field=field)
    if kind in ("regex", "grammar") and isinstance(value, str) and value:
        return StructuredOutput(kind=kind, value=value, field=field)
    expected = {"json": "a JSON schema", "choice": "a non-empty list of strings"}.get(kind, "a non-empty string")
    raise OpenAIError(400, f"{field} must be {expected}", param=field)
