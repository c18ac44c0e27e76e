"""Secrets in the config: a multi-node deployment needs one shared deployment secret (the launcher
refuses to start without it, so check-config says so first), and a secret in a YAML file that every
local user can read is worth a warning.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.rules.host import shell_word
from pdlaunch.config.yaml_strict import read_yaml
from pdlaunch.errors import ConfigError

SECRET_ENV = "PDLAUNCH_DEPLOYMENT_SECRET"  # the launcher reads the same variable
API_KEY_ENV = "PDLAUNCH_API_KEY"
MIN_SECRET_CHARS = 16  # as security.deployment_secret's own min_length
_MAKE_SECRET = "e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`"


def secret_problems(cfg: DeploymentConfig, env: Mapping[str, str]) -> list[Problem]:
    """Several nodes must share one secret: from the config or PDLAUNCH_DEPLOYMENT_SECRET."""
    if cfg.security.deployment_secret:
        return []
    given = env.get(SECRET_ENV)
    if given is not None and 0 < len(given) < MIN_SECRET_CHARS:
        return [problem(SECRET_ENV, f"is {len(given)} characters, fewer than {MIN_SECRET_CHARS}",
                        f"use a longer random value, {_MAKE_SECRET}")]
    if len(cfg.parallel.nodes) > 1 and not given:
        return [problem("security.deployment_secret", "a multi-node deployment needs one shared secret, and none "
                        f"is set here or in {SECRET_ENV}", f"set security.deployment_secret ({MIN_SECRET_CHARS}+ "
                        f"characters) or {SECRET_ENV} to the same value on every node, {_MAKE_SECRET}")]
    return []


def world_readable_secret_warnings(path: Path | None) -> list[Problem]:
    """Warnings (not errors) for secrets written into a YAML file that any local user may read."""

    if path is None:
        return []
    try:
        mode = Path(os.path.expanduser(str(path))).stat().st_mode
        security = read_yaml(path).get("security") if mode & stat.S_IROTH else None
    except (OSError, ConfigError):  # an unreadable file is reported as an error already
        return []
    if not isinstance(security, Mapping):
        return []
    warnings: list[Problem] = []
    if security.get("api_key"):
        warnings.append(problem("security.api_key", f"is written in {str(path)!r}, which every local user can read",
                                f"pass it in {API_KEY_ENV} instead, or `chmod o-r {shell_word(str(path))}`"))
    if security.get("deployment_secret"):
        warnings.append(problem("security.deployment_secret", f"is written in {str(path)!r}, which every local "
                                "user can read",
                                f"pass it in {SECRET_ENV} instead, or `chmod o-r {shell_word(str(path))}`"))
    return warnings
