"""A request body's pydantic ValidationError in our words, for routes whose model is plain data (the internal KV
routes): a 400 naming the field as the caller sent it, what was wrong with it and what to send, where pydantic's
own read "engine_id: Field required" or "junk: Extra inputs are not permitted". What a field takes is its
`Field(description=...)`, written to follow "must be"; a model's own validators already speak our words (their
ValueError's text is the message)."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from pdlaunch.errors import error_text, json_kind
from pdlaunch.http.errors import OpenAIError, param_of


def body_error(exc: ValidationError, model: type[BaseModel], route: str) -> OpenAIError:
    """The first problem of `exc` (`model` validating the body of `route`, e.g. "POST /internal/kv/release") as a
    400 naming its field; the others are counted, as http/errors.validation_error counts them."""
    errors = exc.errors()
    if not errors:
        return OpenAIError(400, f"invalid request body for {route}")
    first = errors[0]
    param = param_of(tuple(first["loc"]))
    message = _problem(first, param, model, route)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return OpenAIError(400, message, param=param)


def _problem(error: ErrorDetails, param: str, model: type[BaseModel], route: str) -> str:
    loc = tuple(error["loc"])
    field = model.model_fields.get(str(loc[0])) if loc else None
    if error["type"] == "extra_forbidden" or (loc and field is None):
        return f"{param} is not a field of {route} (its fields: {', '.join(model.model_fields)}); leave it out"
    if field is None or field.description is None:  # the model's own validator, or a field described nowhere
        return error_text(error) if field is None else f"{param}: {error_text(error)}"
    if error["type"] == "missing":
        return f"{param} is missing; send it: {field.description}"
    return f"{param} must be {field.description} (got {_shown(error.get('input'))})"


def _shown(value: object) -> str:
    """What the caller sent, as the message names it: its JSON kind, and a string's length (the bounds a string
    field has are on its length)."""
    if isinstance(value, str):
        return f"a string of {len(value)} characters" if value else "an empty string"
    return json_kind(value)
