"""The float flags of `pdlaunch bench`: NaN and infinity named for what they are. Typer reads `nan` and `inf` as
floats, and a bound such as `gt=0` then said `--burstiness: Input should be greater than 0` of NaN, or let an
infinite burstiness or SLO through. Each flag says what it takes instead; only `--request-rate` takes inf (all
requests at once, as vLLM's bench and the flag's help say)."""

from __future__ import annotations

import math

from pydantic import BeforeValidator


def non_finite(value: float, what: str, allow_inf: bool = False) -> str | None:
    """Why `value` is no `what` ("not a number (NaN)" or "infinite"), as one "what; how to fix" message; None when
    it is finite (or infinite where `allow_inf`)."""
    if math.isnan(value):
        return f"{value} is not a number (NaN); give {what}"
    if math.isinf(value) and not allow_inf:
        return f"{value} is infinite; give {what}"
    return None


def finite(what: str, allow_inf: bool = False) -> BeforeValidator:
    """A validator for an Annotated float field (before its bounds, which would misname NaN): `what` is what the
    flag takes, e.g. "a positive number of seconds, e.g. 600"."""

    def check(value: object) -> object:
        why = non_finite(value, what, allow_inf) if isinstance(value, float) else None
        if why is not None:
            raise ValueError(why)
        return value

    return BeforeValidator(check)
