"""Turn pydantic ValidationErrors into one Problem per field: dotted path, readable message, fix hint."""

from __future__ import annotations

import difflib
import reprlib
import types
import typing

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.launcher_config import SECRET_PATHS
from pdlaunch.config.problems import Problem, problem


def loc_to_path(loc: tuple[int | str, ...]) -> str:
    """('instances', 1, 'count') -> 'instances[1].count'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "config"


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The pydantic model inside `Model`, `list[Model]`, `Model | None`, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The config model whose keys live at `loc` (list indices are skipped), or None past a leaf."""
    model: type[BaseModel] | None = DeploymentConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _model_in(model.model_fields[part].annotation)
    return model


def _field_info(loc: tuple[int | str, ...]) -> FieldInfo | None:
    names = [p for p in loc if isinstance(p, str)]
    if not names:
        return None
    parent = model_at(loc[: max(i for i, p in enumerate(loc) if isinstance(p, str))])
    if parent is None:
        return None
    return parent.model_fields.get(names[-1])


def all_key_paths(model: type[BaseModel] = DeploymentConfig, prefix: str = "") -> list[str]:
    """Every dotted key path of the config (list items written as `[]`)."""
    paths: list[str] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        paths.append(path)
        child = _model_in(info.annotation)
        if child is not None:
            is_list = typing.get_origin(info.annotation) is list
            paths += all_key_paths(child, path + ("[]" if is_list else ""))
    return paths


def did_you_mean(key: str, loc: tuple[int | str, ...]) -> str:
    """A fix hint for an unknown key: a close local key, or where a same-named key lives elsewhere."""
    parent = model_at(loc[:-1])
    local = list(parent.model_fields) if parent is not None else []
    norm = key.strip().replace("-", "_").lower()
    close = difflib.get_close_matches(norm, local, n=1, cutoff=0.6)
    if close:
        return f"did you mean `{close[0]}`?"
    elsewhere = [p for p in all_key_paths() if p.rsplit(".", 1)[-1] == norm]
    if elsewhere:
        return f"did you mean `{elsewhere[0]}`? (that key lives there)"
    leaves = {p.rsplit(".", 1)[-1]: p for p in all_key_paths()}
    close = difflib.get_close_matches(norm, list(leaves), n=1, cutoff=0.75)
    if close:
        return f"did you mean `{leaves[close[0]]}`?"
    return "valid keys here: " + ", ".join(local) if local else "remove it"


# A value's repr in a message: bounded in depth and items, so that a YAML alias bomb (nine aliases of nine
# aliases... ten deep: 1 KB of text, 10**9 items) is not printed whole before being cut to 60 characters.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 200, 200


def short_repr(value: object) -> str:
    """`value` as a message shows it: its repr, at most 60 characters."""
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}


def _hidden(value: object) -> str:
    """What an error says of a secret's value (security.api_key, ...): its type and length, never the value."""
    kind = type(value).__name__
    article = "an" if kind[:1] in "aeiou" else "a"
    size = f", {len(str(value))} characters" if isinstance(value, str | int | float) else ""
    return f"{article} {kind} (value hidden{size})"


def _describe(err: ErrorDetails) -> tuple[str, str]:
    """(what is wrong, how to fix it) for one pydantic error."""
    kind, loc, value = err["type"], tuple(err["loc"]), err.get("input")
    secret = loc_to_path(loc) in SECRET_PATHS
    shown = _hidden(value) if secret else short_repr(value)
    info = _field_info(loc)
    hint = f"expected: {info.description}" if info is not None and info.description else "fix the value"
    if kind == "extra_forbidden":
        return f"unknown key `{loc[-1]}`", did_you_mean(str(loc[-1]), loc)
    if kind == "invalid_key":
        return f"key {short_repr(value)} is not a string", "config keys are names like `block_size`"
    if kind == "missing":
        return "required key is missing", f"add it ({hint})"
    if kind == "literal_error":
        return f"{shown} is not allowed", f"use {err.get('ctx', {}).get('expected', 'a listed value')}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        if loc == ("model",) and isinstance(value, str):  # vLLM's configs name the model in one line
            return f"expected a mapping of keys, got the string {short_repr(value)}", \
                f"write `model: {{path: {value}}}`"
        return f"expected a mapping of keys, got {type(value).__name__}", "write `key: value` pairs under it"
    if kind == "list_type":
        return f"expected a list, got {type(value).__name__}", hint
    if kind in _BOUNDS:
        symbol, key = _BOUNDS[kind]
        return f"must be {symbol} {err.get('ctx', {}).get(key)}, got {shown}", hint
    if kind == "value_error":  # our own validators write "what is wrong; how to fix it"
        what, _, fix = str(err.get("msg", "")).removeprefix("Value error, ").partition("; ")
        return what, fix or hint
    msg = str(err.get("msg", "invalid value"))
    msg = msg[0].lower() + msg[1:] if msg else "invalid value"
    # pydantic's own text may already say what it got ("..., got a number with a fractional part")
    return f"{msg}{'; it is' if ', got ' in msg else ', got'} {shown}", hint


def problems_from_validation_error(exc: ValidationError) -> list[Problem]:
    """One Problem per pydantic error, named by its dotted path (flag_names renames flag-set ones)."""
    problems: list[Problem] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = loc_to_path(loc[:-1] if err["type"] == "invalid_key" else loc)
        what, hint = _describe(err)
        problems.append(problem(path, what, hint))
    return problems
