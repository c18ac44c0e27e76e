"""PDLAUNCH_LOG_LEVEL, read by the proxy and every instance (`PDLAUNCH_LOG_LEVEL=debug pdlaunch serve`: a line per
request). A value that is no level leaves them at info; check-config and serve say so, since the processes that read
it cannot tell the user (a `debgu` typo gave no per-request lines and no word why)."""

from __future__ import annotations

from collections.abc import Mapping

from pdlaunch.config.problems import Problem, problem

LOG_LEVEL_ENV = "PDLAUNCH_LOG_LEVEL"
LOG_LEVELS = ("debug", "info", "warning", "error")


def log_level_warnings(env: Mapping[str, str]) -> list[Problem]:
    """A warning when `env` sets PDLAUNCH_LOG_LEVEL to what no process reads as a level (case is ignored)."""
    level = env.get(LOG_LEVEL_ENV)
    if level is None or level.lower() in LOG_LEVELS:
        return []
    return [problem(LOG_LEVEL_ENV, f"{level!r} is not a log level, so the proxy and the instances log at info",
                    f"set it to {', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}, or unset it")]
