"""OpenAI's `strict` switch of a JSON schema: `response_format.json_schema.strict` and a tool's `function.strict`.

vLLM accepts both and does nothing with them (its guidance backend closes objects only when the server is started
with `disable_additional_properties`). Here `strict: true` keeps every object of that schema that lists
`properties` and says nothing of `additionalProperties` closed (engine/strict_schema.close_objects) whatever the
request's `structured_outputs.disable_additional_properties` says: strict is the schema's own word, as an explicit
`"additionalProperties": false` on each object is, which that option does not open either.

OpenAI's strict mode also refuses a schema with a property its object's `required` leaves out, an
`additionalProperties` other than false, or an object without `properties`. Those are not refused here: clients
move from vLLM, which serves such schemas with `strict: true` (pydantic writes `dict[str, str]` as
`"additionalProperties": {"type": "string"}`, an optional field as one left out of `required`), and the schema
says what it allows: an optional property stays optional, an explicit `additionalProperties` is kept, an object
without `properties` stays any object. `strict: false`, null or absent: the schema is served as any other (closed
unless the request opens objects). Another value is a 400 naming the field; a `$ref` that names nothing is a 400
naming its place, strict or not.
"""

from __future__ import annotations

from pdlaunch.engine.schema_refs import SchemaError, root_pointers
from pdlaunch.http import JsonValue
from pdlaunch.http.errors import OpenAIError


def strict_flag(value: JsonValue, param: str) -> bool:
    """The `strict` field's value: True only for JSON true; a value other than a boolean or null is a 400."""
    if value is not None and not isinstance(value, bool):
        raise OpenAIError(400, f"{param} must be true or false", param=param)
    return value is True


def check_strict_schema(schema: JsonValue, param: str) -> None:
    """A 400 naming a `$ref` of `schema` (the request field `param`) that names nothing: checked for a strict tool
    whatever `tool_choice` says (without strict, a tool's schema is read only when a call is forced)."""
    try:
        root_pointers(schema, param)
    except SchemaError as exc:
        raise OpenAIError(400, f"invalid grammar: {exc}", param=exc.field) from None
