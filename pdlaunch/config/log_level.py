"""PDLAUNCH_LOG_LEVEL, read by the proxy and every instance (`PDLAUNCH_LOG_LEVEL=debug pdlaunch serve`: a line per
request). A value that is no level leaves them at info; check-config and serve say so (config/serving_env.py), since
the processes that read it cannot tell the user (a `debgu` typo gave no per-request lines and no word why)."""

from __future__ import annotations

LOG_LEVEL_ENV = "PDLAUNCH_LOG_LEVEL"
LOG_LEVELS = ("debug", "info", "warning", "error")
