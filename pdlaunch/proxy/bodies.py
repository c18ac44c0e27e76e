"""JSON as the proxy passes it through: client bodies, instance answers, stream chunks.

The proxy forwards a client's body with every field, those it does not read included (the instances
judge them), so a body stays a JSON object rather than a model: parse_client_body has validated it as
a CompletionRequest / ChatCompletionRequest before any field is read here. The readers below narrow
one field of it to the type the caller needs.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import JsonValue

JsonObject = dict[str, JsonValue]
Body = Mapping[str, JsonValue]  # a body read, not changed


def as_object(value: JsonValue | None) -> JsonObject | None:
    """`value` when it is a JSON object."""
    return value if isinstance(value, dict) else None


def list_of(value: JsonValue | None) -> list[JsonValue]:
    """`value` when it is a JSON list, else an empty one."""
    return value if isinstance(value, list) else []


def objects(value: JsonValue | None) -> list[JsonObject]:
    """The objects of a JSON list (`choices`); anything else in it, or a value that is no list, gives none."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def int_of(value: JsonValue | None) -> int | None:
    """`value` when it is a JSON integer (not a boolean)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def ids_of(value: JsonValue | None) -> list[int]:
    """A list of token ids (no list: none). ValueError for a list with anything but integers in it: ids a
    stream is continued from (migrate.py) are never guessed from a float, a NaN or a boolean."""
    if not isinstance(value, list):
        return []
    ids = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    if len(ids) != len(value):
        raise ValueError("token ids that are not all integers")
    return ids


def several_prompts(prompt: JsonValue | None) -> bool:
    """A /v1/completions `prompt` that is a list of prompts (strings or token id lists), not one prompt."""
    return isinstance(prompt, list) and len(prompt) != 1 and \
        not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def token_limit(body: Body, chat: bool, chat_key: str, key: str) -> JsonValue | None:
    """The client's limit `key` (max_tokens, min_tokens), or for chat `chat_key` when given (OpenAI's
    max_completion_tokens / min_completion_tokens names)."""
    return body.get(chat_key) if chat and body.get(chat_key) is not None else body.get(key)
