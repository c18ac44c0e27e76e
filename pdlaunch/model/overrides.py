"""Launch settings a benchmark sets through an environment variable (`field=value:field=value`) so it can time them
inside whole steps before they go into a table or tile file (benchmarks/moe_speed.py --variants): the MoE tile
(PDLAUNCH_MOE_TILE, moe/fused.py) and the paged decode's launch (PDLAUNCH_DECODE_LAUNCH, triton_decode.py); and the
variables that pick one of a few named choices (`env_choice`, e.g. PDLAUNCH_PDL=off)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, TypeVar

from pdlaunch.errors import PdlaunchError

T = TypeVar("T")


def whole_number(text: str) -> bool:
    """`text` is ASCII digits only (str.isdigit also takes `²` and other scripts' digits, which int() refuses or
    reads as another number)."""
    return text.isascii() and text.isdigit()


def env_choice(variable: str, choices: tuple[str, ...]) -> str:
    """os.environ's `variable` as one of `choices`, the first (the default) when unset or empty; any other value,
    a misspelt one included, is refused naming the variable and the choices."""
    value = os.environ.get(variable, "")
    if not value:
        return choices[0]
    if value not in choices:
        raise PdlaunchError(f"{variable}={value!r} is not a choice", field=variable,
                            hint=f"use {', '.join(choices)}, or unset it for {choices[0]}")
    return value


def with_fields(settings: T, fields: Mapping[str, int | bool], size: int, limit: str) -> T:
    """`settings` (a dataclass) with `fields` in place of its own when `size` is at most fields[limit] (no
    limit: always); `limit` itself is no field of `settings`."""
    if not fields or size > fields.get(limit, size):
        return settings
    changes: dict[str, Any] = {name: value for name, value in fields.items() if name != limit}
    return replace(settings, **changes)  # type: ignore[type-var]


def field_override(variable: str, setting: str, kinds: Mapping[str, type], powers_of_two: frozenset[str],
                   noun: str, example: str, zero_ok: frozenset[str] = frozenset()) -> dict[str, int | bool]:
    """The fields `setting` names, as numbers (`bool` kinds: 0 or 1; the others 1 or more, or 0 for those in
    `zero_ok`, and powers of two for those in `powers_of_two`). A part that names no field of `kinds`, or whose
    value is no whole number or out of range, is refused naming `variable` (the error's field) and the part."""
    fields: dict[str, int | bool] = {}
    hint = f"field=value pairs joined by ':' over {', '.join(kinds)}, e.g. {example}"
    for part in filter(None, setting.split(":")):
        raw_name, _, value = part.partition("=")
        name = raw_name.strip()
        kind = kinds.get(name)
        if kind is None or not whole_number(value.strip()):
            raise PdlaunchError(f"{variable}: {part!r} is not a {noun} field and a whole number", field=variable,
                                hint=hint)
        number = int(value)
        power_of_two = number >= 1 and not number & (number - 1)
        if (kind is bool and number not in (0, 1)) or (kind is int and number < (name not in zero_ok)) or (
                name in powers_of_two and not power_of_two):
            raise PdlaunchError(f"{variable}: {part!r} is out of range", field=variable,
                                hint=f"{', '.join(sorted(powers_of_two))} are powers of two, the other numbers 1 "
                                     f"or more{''.join(f', {z} 0 or more' for z in sorted(zero_ok))}; booleans 0 or 1")
        fields[name] = bool(number) if kind is bool else number
    return fields
