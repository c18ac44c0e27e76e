"""PDLAUNCH_GIL_SWITCH_MS: how long one thread of an instance process may hold the GIL while another waits for it
(sys.setswitchinterval), read by every instance. An instance runs its engine thread and its HTTP event loop in one
process: with Python's default of 5 ms, an answer ready on one thread waited for the other's turn to end. At 0.5 ms,
on one H200 (8B shape, 4096-token prompts one at a time, benchmarks/RESULTS.md 2026-11-29): PD TTFT median 116.9
against 125.7 ms (the prefill instance's own request time 99.0 against 106.2 ms), TPOT median colocated 4.5 against
4.8 ms and PD 5.1 against 5.35 ms; colocated TTFT the same (109.3 against 109.1 ms). Under load (256 prompts of
1024 in / 128 out, 64 in flight, four alternating runs) throughput and ITL p99 were within the spread between runs.
A value that is no positive number of milliseconds up to 100 leaves the default; check-config and serve say so,
since the processes that read it cannot tell the user."""

from __future__ import annotations

import math
from collections.abc import Mapping

from pdlaunch.config.problems import Problem, problem

GIL_SWITCH_ENV = "PDLAUNCH_GIL_SWITCH_MS"
DEFAULT_GIL_SWITCH_MS = 0.5
MAX_GIL_SWITCH_MS = 100.0


def _milliseconds(env: Mapping[str, str]) -> float | None:
    """The variable's value, or None when it is unset or no number of milliseconds in (0, MAX]."""
    text = env.get(GIL_SWITCH_ENV)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 < value <= MAX_GIL_SWITCH_MS else None


def gil_switch_seconds(env: Mapping[str, str]) -> float:
    """The interval an instance sets (sys.setswitchinterval takes seconds)."""
    value = _milliseconds(env)
    return (DEFAULT_GIL_SWITCH_MS if value is None else value) / 1000


def gil_switch_warnings(env: Mapping[str, str]) -> list[Problem]:
    """A warning when `env` sets PDLAUNCH_GIL_SWITCH_MS to what the instances do not read as an interval."""
    if GIL_SWITCH_ENV not in env or _milliseconds(env) is not None:
        return []
    return [problem(GIL_SWITCH_ENV, f"{env[GIL_SWITCH_ENV]!r} is not a number of milliseconds in (0, "
                    f"{MAX_GIL_SWITCH_MS:g}], so the instances switch threads every {DEFAULT_GIL_SWITCH_MS:g} ms",
                    f"set it to e.g. {DEFAULT_GIL_SWITCH_MS:g} (the default) or 5 (Python's own), or unset it")]
