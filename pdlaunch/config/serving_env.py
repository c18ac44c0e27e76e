"""The environment variables that the proxy and the instances read at run time and that, given a value they do not
take, fall back to their default instead of refusing it. Those processes cannot tell the user (a typo such as
`PDLAUNCH_ARRIVAL_WINDOW=OFF` changed nothing and said nothing), so check-config and serve warn, naming the variable,
its value, what the processes do instead and the values they take.

The GPU tuning variables (PDLAUNCH_PDL, PDLAUNCH_BLAS, PDLAUNCH_PROMPT_ROWS, ...) are not here: a GPU instance
refuses a value it does not take, naming the variable (model/overrides.py env_choice). README "Environment
variables" lists every variable."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

from pdlaunch.config.gil_switch import DEFAULT_GIL_SWITCH_MS, GIL_SWITCH_ENV, MAX_GIL_SWITCH_MS, milliseconds
from pdlaunch.config.log_level import LOG_LEVEL_ENV, LOG_LEVELS
from pdlaunch.config.problems import Problem, problem

ARRIVAL_WINDOW_ENV = "PDLAUNCH_ARRIVAL_WINDOW"
# engine/arrival_window.py reads exactly "off" as off; any other value leaves the window on
ARRIVAL_WINDOW_VALUES = ("on", "off")


class FallbackVariable(NamedTuple):
    """A variable whose every value but the ones `takes` accepts leaves the processes at their default."""

    name: str
    takes: Callable[[str], bool]  # as the processes that read it compare the value
    expected: str  # what a value must be, after "is not"
    instead: str  # what the processes do with any other value
    accepted: str  # the values to suggest, after "set it to"


FALLBACK_VARIABLES = (
    FallbackVariable(LOG_LEVEL_ENV, lambda value: value.lower() in LOG_LEVELS, "a log level",
                     "the proxy and the instances log at info", f"{', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}"),
    FallbackVariable(GIL_SWITCH_ENV, lambda value: milliseconds(value) is not None,
                     f"a number of milliseconds in (0, {MAX_GIL_SWITCH_MS:g}]",
                     f"the instances switch threads every {DEFAULT_GIL_SWITCH_MS:g} ms",
                     f"e.g. {DEFAULT_GIL_SWITCH_MS:g} (the default) or 5 (Python's own)"),
    FallbackVariable(ARRIVAL_WINDOW_ENV, lambda value: value in ARRIVAL_WINDOW_VALUES, "on or off (lower case)",
                     "the instances keep the arrival window on", "on (the default) or off"),
)


def serving_env_warnings(env: Mapping[str, str]) -> list[Problem]:
    """A warning for each variable of FALLBACK_VARIABLES that `env` sets to a value the processes do not take."""
    return [problem(v.name, f"{env[v.name]!r} is not {v.expected}, so {v.instead}", f"set it to {v.accepted}, or "
                    "unset it") for v in FALLBACK_VARIABLES if v.name in env and not v.takes(env[v.name])]
