"""The environment variables that the proxy and the instances read at run time and that, given a value they do not
take, fall back to their default instead of refusing it. Those processes cannot tell the user (a typo such as
`PDLAUNCH_ARRIVAL_WINDOW=OFF` changed nothing and said nothing), so check-config and serve warn, naming the variable,
its value, what the processes do instead and the values they take.

The GPU tuning variables (PDLAUNCH_PDL, PDLAUNCH_BLAS, PDLAUNCH_PROMPT_ROWS, ...) and the test-only
PDLAUNCH_TEST_FAIL_TRANSFER_RATE are refused instead: an instance refuses a value it does not take, naming the
variable (model/overrides.py env_choice), but only where it first reads it, often after loading its weights. So
check-config and serve run the instances' own parsers of REFUSED_VARIABLES before anything starts and report what
they refuse, with their message (`refused_value_problems`), on any device. README "Environment variables" lists
every variable.

MC_TRANSFER_TIMEOUT is Mooncake's own: its transfer engine reads the leading digits of the value, at least 5 s
(`mooncake_transfer_timeout`), so `120s` is 120 s there and `abc` 5 s. The Mooncake connector waits past that
reading for a WRITE it released (kv_transfer/mooncake/sender.py), and check-config and serve refuse a value Mooncake
reads as another number than it shows, before anything starts (`mooncake_env_problems`)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.gil_switch import DEFAULT_GIL_SWITCH_MS, GIL_SWITCH_ENV, MAX_GIL_SWITCH_MS, milliseconds
from pdlaunch.config.log_level import LOG_LEVEL_ENV, LOG_LEVELS
from pdlaunch.config.problems import Problem, problem
from pdlaunch.errors import PdlaunchError

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


# Each variable an instance refuses a value of, as its instance parser names it (_instance_parsers).
REFUSED_VARIABLES = (
    "PDLAUNCH_BLAS", "PDLAUNCH_PDL", "PDLAUNCH_FUSED_OPS", "PDLAUNCH_PAGED_DECODE", "PDLAUNCH_PAGED_PREFILL",
    "PDLAUNCH_GEMV", "PDLAUNCH_SWIGLU", "PDLAUNCH_DECODE_GEMM", "PDLAUNCH_ATTN_EARLY", "PDLAUNCH_FP8_QK",
    "PDLAUNCH_PROMPT_ROWS", "PDLAUNCH_MIXED_GRAPH_TOKENS", "PDLAUNCH_MOE_BACKEND", "PDLAUNCH_MOE_TILE",
    "PDLAUNCH_DECODE_LAUNCH", "PDLAUNCH_GEMV_CONFIG", "PDLAUNCH_PREFILL_LAUNCH", "PDLAUNCH_TEST_FAIL_TRANSFER_RATE",
)


def _instance_parsers() -> dict[str, Callable[[], object]]:
    """The parser an instance reads each of REFUSED_VARIABLES with, from os.environ, raising its PdlaunchError for
    a value it does not take. Imported only when one of them is set: they import torch, which check-config and a
    CPU deployment's launcher otherwise never load."""
    import torch

    from pdlaunch.kv_transfer.fault import TransferFaults  # layering: lazy (the decode's own check, when it is set)
    from pdlaunch.model import decode_gemm, decode_launch, fused_ops, gemv, pdl, swiglu, triton_decode, triton_prefill
    from pdlaunch.model.blas import blas_setting
    from pdlaunch.model.moe import fused
    from pdlaunch.runner.graph_setup import prompt_rows_setting  # layering: lazy (torch stays off config paths)
    from pdlaunch.runner.mixed_graphs import max_mixed_tokens  # layering: lazy (torch stays off config paths)

    def value(name: str) -> str:
        return os.environ.get(name, "")

    return {
        "PDLAUNCH_BLAS": blas_setting,
        "PDLAUNCH_PDL": pdl.pdl_setting,
        "PDLAUNCH_FUSED_OPS": fused_ops.fused_ops_setting,
        "PDLAUNCH_PAGED_DECODE": triton_decode.paged_decode_setting,
        "PDLAUNCH_PAGED_PREFILL": triton_prefill.paged_prefill_setting,
        "PDLAUNCH_GEMV": gemv.gemv_setting,
        "PDLAUNCH_SWIGLU": swiglu.swiglu_setting,
        "PDLAUNCH_DECODE_GEMM": decode_gemm.decode_gemm_setting,
        "PDLAUNCH_ATTN_EARLY": triton_decode.attention_early,
        "PDLAUNCH_FP8_QK": triton_decode.fp8_qk_f16,
        "PDLAUNCH_PROMPT_ROWS": prompt_rows_setting,
        "PDLAUNCH_MIXED_GRAPH_TOKENS": lambda: max_mixed_tokens(False),
        "PDLAUNCH_MOE_BACKEND": lambda: fused.backend(torch.empty(0), 0),  # the variable first, then the tensor
        "PDLAUNCH_MOE_TILE": lambda: fused.tile_override(value("PDLAUNCH_MOE_TILE")),
        "PDLAUNCH_DECODE_LAUNCH": lambda: decode_launch.launch_override(value("PDLAUNCH_DECODE_LAUNCH")),
        "PDLAUNCH_GEMV_CONFIG": lambda: gemv.config_override(value("PDLAUNCH_GEMV_CONFIG")),
        "PDLAUNCH_PREFILL_LAUNCH": triton_prefill.prefill_launch,
        "PDLAUNCH_TEST_FAIL_TRANSFER_RATE": TransferFaults,
    }


def refused_value_problems() -> list[Problem]:
    """A problem for each of REFUSED_VARIABLES that os.environ (what the processes serve starts inherit) sets to a
    value an instance would refuse: the instance's own error, field, message and hint."""
    set_here = [name for name in REFUSED_VARIABLES if name in os.environ]
    if not set_here:
        return []
    parsers = _instance_parsers()
    found: list[Problem] = []
    for name in set_here:
        try:
            parsers[name]()
        except PdlaunchError as exc:
            found.append(problem(exc.field or name, exc.message, exc.hint or ""))
    return found


def serving_env_problems(cfg: DeploymentConfig | None) -> list[Problem]:
    """What check-config and serve refuse in os.environ before anything starts: refused_value_problems, and for a
    deployment that moves KV with Mooncake (`cfg`, None when it did not load), mooncake_env_problems."""
    return refused_value_problems() + mooncake_env_problems(os.environ, cfg)


MC_TRANSFER_TIMEOUT_ENV = "MC_TRANSFER_TIMEOUT"
MC_TRANSFER_TIMEOUT_DEFAULT_S = 30  # Mooncake's transfer timeout when the variable is unset
MC_TRANSFER_TIMEOUT_MIN_S = 5  # ... and at least this when it is set, whatever the value
# ... plus this for each byte the transfer moves: Mooncake's synchronous transfers give up at
# `transfer_timeout_nsec_ + total_length` nanoseconds (TransferEnginePy::batchTransferSync), 1 s per GB.
MC_TRANSFER_SECONDS_PER_BYTE = 1e-9
_C_INT_MAX = 2**31 - 1
_C_SPACE = "[ \t\n\v\f\r]*"  # what strtol skips before the number (C's isspace)
_STRTOL_PREFIX = re.compile(_C_SPACE + "([+-]?[0-9]+)")
# A value Mooncake reads as the number it shows: strtol takes a leading + as it does the digits (`+40` is 40 s)
_WHOLE_SECONDS = re.compile(_C_SPACE + "[+]?[0-9]+" + _C_SPACE)


def mooncake_transfer_timeout(env: Mapping[str, str]) -> int:
    """The seconds Mooncake's transfer engine gives a synchronous transfer (plus a nanosecond a byte it
    moves: MC_TRANSFER_SECONDS_PER_BYTE), read as
    Mooncake 0.3.13 reads MC_TRANSFER_TIMEOUT (TransferEnginePy's constructor in mooncake/engine.so): 30 when it is
    unset, else `max(5, (int)strtol(value, NULL, 10))`. So only the leading digits count (`120s` is 120 s, `1.5e3`
    1 s and so 5), no digits read as 0 (`abc`, ``: 5 s), and a number past the C int range wraps. Measured: a WRITE
    to a stopped peer failed after 5.0 s with `abc` and 8.0 s with `8s`."""
    raw = env.get(MC_TRANSFER_TIMEOUT_ENV)
    if raw is None:
        return MC_TRANSFER_TIMEOUT_DEFAULT_S
    value = (_strtol(raw) + 2**31) % 2**32 - 2**31  # the long strtol returns, cut to an int
    return max(MC_TRANSFER_TIMEOUT_MIN_S, value)


def _strtol(text: str) -> int:
    """strtol(text, NULL, 10): the leading digits (0 when there are none), stopped at the range of a long. Of a
    number past that range only its first 20 significant digits are converted: enough to place it past the range,
    and int() refuses a string of more than 4300 digits (ValueError) where strtol reads it."""
    digits = _STRTOL_PREFIX.match(text)
    if digits is None:
        return 0
    number = digits.group(1)
    sign = "-" if number.startswith("-") else ""
    value = int(sign + (number.lstrip("+-").lstrip("0")[:20] or "0"))
    return max(-(2**63), min(value, 2**63 - 1))


def mooncake_env_problems(env: Mapping[str, str], cfg: DeploymentConfig | None) -> list[Problem]:
    """MC_TRANSFER_TIMEOUT set to a value that Mooncake does not read as the number it shows (anything but a whole
    number of seconds from 5 to the C int's top), for a deployment that moves KV with Mooncake. Mooncake would not
    say so, and the user would wait in vain for the timeout they meant."""
    raw = env.get(MC_TRANSFER_TIMEOUT_ENV)
    if raw is None or cfg is None or cfg.colocated or cfg.kv_transfer.connector != "mooncake":
        return []
    if _WHOLE_SECONDS.fullmatch(raw) and MC_TRANSFER_TIMEOUT_MIN_S <= _strtol(raw) <= _C_INT_MAX:
        return []
    return [problem(MC_TRANSFER_TIMEOUT_ENV,
                    f"{raw!r} is not a whole number of seconds from {MC_TRANSFER_TIMEOUT_MIN_S} to {_C_INT_MAX}: "
                    f"Mooncake's transfer engine would read it as {mooncake_transfer_timeout(env)} s (its leading "
                    f"digits, at least {MC_TRANSFER_TIMEOUT_MIN_S})",
                    f"set it to a whole number of seconds, e.g. {MC_TRANSFER_TIMEOUT_DEFAULT_S} (Mooncake's default "
                    "when it is unset), or unset it")]
