"""The number and choice flags of `pdlaunch bench`, in pdlaunch's words: each error says the value typed, what is
wrong with it and what the flag takes (`--num-prompts: 0 must be at least 1; give a number of requests ...`), where
pydantic's own said `--num-prompts: Input should be greater than or equal to 1`. NaN and infinity are named for
what they are: typer reads `nan` and `inf` as floats, and a bound such as `gt=0` then said `--burstiness: Input
should be greater than 0` of NaN, or let an infinite burstiness or SLO through. Only `--request-rate` takes inf
(all requests at once, as vLLM's bench and the flag's help say)."""

from __future__ import annotations

import math

from pydantic import ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import ErrorDetails

# pydantic's error type -> (its context key, how the value misses the bound)
_BOUNDS = {"greater_than": ("gt", "must be greater than"), "greater_than_equal": ("ge", "must be at least"),
           "less_than": ("lt", "must be less than"), "less_than_equal": ("le", "must be at most")}


def non_finite(value: float, what: str, allow_inf: bool = False) -> str | None:
    """Why `value` is no `what` ("not a number (NaN)" or "infinite"), as one "what; how to fix" message; None when
    it is finite (or infinite where `allow_inf`)."""
    if math.isnan(value):
        return f"{value} is not a number (NaN); give {what}"
    if math.isinf(value) and not allow_inf:
        return f"{value} is infinite; give {what}"
    return None


def shown(value: object) -> str:
    """A number as the user would have typed it: 0 not 0.0, 1000000000 not 1e+09; anything else as repr."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value) if isinstance(value, int | float) else repr(value)


def _wrong(error: ErrorDetails, value: object) -> str | None:
    """What is wrong with `value`, from pydantic's `error` of a bound or a choice; None for any other error."""
    if error["type"] in _BOUNDS:
        key, words = _BOUNDS[error["type"]]
        return f"{shown(value)} {words} {shown(error.get('ctx', {})[key])}"
    if error["type"] == "literal_error":
        return f"{value!r} must be {error.get('ctx', {})['expected']}"
    return None


def flag(what: str, allow_inf: bool = False) -> WrapValidator:
    """A validator for an Annotated number or choice field, around its bounds (`Field(ge=1)`) or Literal: `what` is
    what the flag takes, e.g. "a positive number of seconds, e.g. 600". NaN and infinity are refused before the
    bounds (which would misname NaN); a value out of bounds or not among the choices is said with `what`."""

    def check(value: object, handler: ValidatorFunctionWrapHandler) -> object:
        why = non_finite(value, what, allow_inf) if isinstance(value, float) else None
        if why is not None:
            raise ValueError(why)
        try:
            return handler(value)
        except ValidationError as exc:
            wrong = _wrong(exc.errors()[0], value)
            if wrong is None:
                raise
            raise ValueError(f"{wrong}; give {what}") from None

    return WrapValidator(check)
