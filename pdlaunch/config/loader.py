"""Load a deployment: YAML file, then flag overrides, then pydantic; every mistake becomes a Problem.

Precedence: flags override the file, the file overrides the model defaults. Override keys are the
dotted paths of `pdlaunch.config.flags.FLAG_PATHS`, plus `instances[<role>].count`.

`cache.cpu_offload_gb` (before it became `cache.kv_offload_gb`, since vLLM's `--cpu-offload-gb`
offloads weights) is still read from a file, with a warning, and problems about it name the old key.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from pdlaunch.config.cli_overrides import Overrides
from pdlaunch.config.deployment_config import DeploymentConfig, says_colocated
from pdlaunch.config.errors_format import problems_from_validation_error, short_repr
from pdlaunch.config.flag_names import FLAG_FOR_PATH, ROLE_PATH, flag_fields, name_flags, typed_flags
from pdlaunch.config.flags import ENV_VARS
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.rules.roles import given_ray_field_problems
from pdlaunch.config.serving_env import serving_env_problems, serving_env_warnings
from pdlaunch.config.yaml_strict import read_yaml
from pdlaunch.errors import ConfigError

if TYPE_CHECKING:
    from pdlaunch.config.target_host import TargetHost

logger = logging.getLogger(__name__)
RENAMED_KEYS = {"cache.cpu_offload_gb": "cache.kv_offload_gb"}  # old YAML key -> its name now


class ParseError(ConfigError):
    """The file or flags did not parse: `partial` is the config with the invalid values put back to their
    defaults (None when that does not parse either), `flags` names each flag-set path by its flag."""

    def __init__(self, problems: list[Problem], partial: DeploymentConfig | None, flags: dict[str, str]) -> None:
        super().__init__(problems)
        self.partial = partial
        self.flags = flags


def rename_old_keys(raw: dict[str, object]) -> tuple[dict[str, str], list[Problem]]:
    """Move each old key of `raw` (in place) to its new name. Returns new path -> old path, for naming
    problems after what the file says, and a problem where a file has both."""
    renamed: dict[str, str] = {}
    problems: list[Problem] = []
    for old, new in RENAMED_KEYS.items():
        section, old_key = old.split(".")
        new_key = new.split(".")[1]
        node = raw.get(section)
        if not isinstance(node, dict) or old_key not in node:
            continue
        if new_key in node:
            problems.append(problem(old, f"given together with {new}, its new name", f"keep only `{new_key}`"))
            continue
        logger.warning("warning: %s: renamed %s (vLLM's cpu_offload_gb offloads weights); read as %s",
                       old, new, new)
        node[new_key] = node.pop(old_key)
        renamed[new] = old
    return renamed, problems


def _set_role_field(raw: dict[str, object], role: str, key: str, value: object, flag: str) -> list[Problem]:
    if "instances" not in raw:
        colocated = says_colocated(raw)
        raw["instances"] = [{"role": "colocated"}] if colocated else [{"role": "prefill"}, {"role": "decode"}]
    groups = raw["instances"]
    if not isinstance(groups, list):
        return [problem("instances", f"expected a list of instance groups, got {type(groups).__name__}",
                        "write `instances: [{role: prefill, count: 1}, {role: decode, count: 1}]`")]
    matching = [g for g in groups if isinstance(g, dict) and g.get("role") == role]
    if len(matching) > 1:
        return [problem("instances", f"{flag} is ambiguous: the file has {len(matching)} {role} groups",
                        f"set `count` on each {role} group in the file instead of {flag}")]
    if matching:
        matching[0][key] = value
    elif key != "count" and says_colocated(raw):
        pass  # a role's setting with no such group to take it: role_flag_warnings says so (a new group is refused)
    else:
        groups.append({"role": role, key: value})
    return []


def apply_overrides(raw: dict[str, object], overrides: Mapping[str, object]) -> list[Problem]:
    """Write each dotted-path override into `raw` (in place). Returns problems for paths that cannot take it."""
    problems: list[Problem] = []
    # Plain paths first: `instances[<role>]` defaults depend on `colocated`, which may itself be a flag.
    ordered = sorted(overrides.items(), key=lambda item: bool(ROLE_PATH.match(item[0])))
    typed = typed_flags(overrides)
    for path, value in ordered:
        flag = typed.get(path) or FLAG_FOR_PATH.get(path, path)
        role_match = ROLE_PATH.match(path)
        if role_match:
            problems += _set_role_field(raw, role_match.group(1), role_match.group(2), value, flag)
            continue
        parts = path.split(".")
        node: dict[str, object] = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                problems.append(problem(where, f"expected a mapping of keys, got {type(child).__name__}",
                                        f"make `{where}` a mapping so that {flag} can set `{path}`"))
                break
            node = child
        else:
            node[parts[-1]] = value
    return problems


def load_deployment(path: Path | None, overrides: Mapping[str, object]) -> DeploymentConfig:
    """Parse and type-check a deployment (no host checks). Raises ConfigError listing every problem."""
    command_line = list(overrides.problems) if isinstance(overrides, Overrides) else []
    try:
        raw = read_yaml(path) if path is not None else {}
    except ConfigError as exc:
        exc.problems[:0] = command_line
        raise
    raw = copy.deepcopy(raw)
    renamed, problems = rename_old_keys(raw)
    problems = command_line + problems + apply_overrides(raw, overrides)
    flags = {**renamed, **flag_fields(overrides, raw.get("instances"))}
    try:
        cfg = _home_expanded(DeploymentConfig.model_validate(raw))
    except ValidationError as exc:
        problems += name_flags(problems_from_validation_error(exc), flags)
        raise ParseError(problems, _salvage(raw, exc), flags) from None
    except RecursionError:
        problems.append(problem("config", "the document refers to itself (recursive YAML anchor)",
                                "remove the recursive alias"))
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    given = name_flags(given_ray_field_problems(cfg), flags)  # fields_set is the user's only here, not after JSON
    if given:
        raise ParseError(given, cfg, flags)
    return cfg


def file_value(raw: dict[str, object], path: str) -> tuple[str, object] | None:
    """(the file's key path, its value) where the file sets override path `path` (`instances[prefill].count`:
    the file's one group of that role), else None."""
    node: object = raw
    where, parts = path, path.split(".")
    role = ROLE_PATH.match(path)
    if role is not None:
        found = raw.get("instances")
        groups = found if isinstance(found, list) else []
        matching = [i for i, g in enumerate(groups) if isinstance(g, dict) and g.get("role") == role[1]]
        if len(matching) != 1:
            return None
        node, where, parts = groups[matching[0]], f"instances[{matching[0]}].{role[2]}", [role[2]]
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return where, node


def role_flag_warnings(path: Path | None, overrides: Mapping[str, object]) -> list[Problem]:
    """A warning for each per-role flag (--decode-expert-parallel) of a colocated deployment without a group of that
    role: it has no effect. A group made for it was refused as "a decode group in a colocated deployment; remove the
    group (and --prefill/--decode)", a group and flags the user never wrote."""
    try:
        raw = read_yaml(path) if path is not None else {}
    except ConfigError:  # reported as the config's own problems
        return []
    colocated = says_colocated({**raw, **({"colocated": overrides["colocated"]} if "colocated" in overrides else {})})
    groups = raw.get("instances")
    roles = {g.get("role") for g in groups if isinstance(g, dict)} if isinstance(groups, list) else set()
    typed = typed_flags(overrides)
    warnings: list[Problem] = []
    for key in overrides:
        match = ROLE_PATH.match(key)
        if not colocated or match is None or match.group(2) == "count" or match.group(1) in roles:
            continue
        warnings.append(problem(typed.get(key) or FLAG_FOR_PATH.get(key, key),
                                f"has no effect: every instance is colocated, with no {match.group(1)} instance to "
                                "take it", "drop it; colocated instances follow --enable-expert-parallel "
                                           "(parallel.enable_expert_parallel)"))
    return warnings


def flag_over_file_warnings(path: Path | None, overrides: Mapping[str, object],
                            own: Collection[str] = ()) -> list[Problem]:
    """A warning for each flag that replaces a different value the file sets: the flag wins, silently otherwise.
    `own`: override paths the caller sets itself, no flag of the user's (bench compare's proxy port): not warned."""
    if path is None or not overrides:
        return []
    try:
        raw = read_yaml(path)
    except ConfigError:  # reported as the config's own problems
        return []
    typed = typed_flags(overrides)
    warnings: list[Problem] = []
    for key, value in overrides.items():
        found = None if key in own else file_value(raw, key)
        if found is None or found[1] == value:
            continue
        where, in_file = found
        flag = typed.get(key) or FLAG_FOR_PATH.get(key, key)
        what = (f"sets {where}, replacing the value in {str(path)!r}" if key.startswith("security.")  # no secret shown
                else f"sets {where} to {short_repr(value)}, replacing {short_repr(in_file)} in {str(path)!r}")
        wins = "the environment wins" if flag in ENV_VARS else "flags win"
        warnings.append(problem(flag, f"{what}: {wins} over the file", "drop one of the two if that is not what you "
                                "meant"))
    return warnings


def _salvage(raw: dict[str, object], exc: ValidationError) -> DeploymentConfig | None:
    """The config with every invalid value put back to its default, so that the cross-field rules
    can still report their problems next to the field errors; None when that does not parse."""
    salvaged = copy.deepcopy(raw)
    for err in exc.errors():
        if not err["loc"]:  # the whole document is wrong (a key that is no string): nothing to salvage
            return None
        *parents, last = err["loc"]
        node: object = salvaged
        for part in parents:
            if isinstance(node, list) and isinstance(part, int):
                node = node[part]
            elif isinstance(node, dict):
                node = node[part]
            else:
                node = None
        if not isinstance(node, dict) or last not in node:
            return None  # a whole list item or section is wrong: nothing sensible to salvage
        del node[last]
    try:
        return _home_expanded(DeploymentConfig.model_validate(salvaged))
    except (ValidationError, KeyError, IndexError, TypeError):
        return None


def _home_expanded(cfg: DeploymentConfig) -> DeploymentConfig:
    """`cfg` with `~` in log_dir expanded, as every other path of the config is where it is read: the launcher makes
    the directory as given, and `log_dir: ~/logs` (or `--log-dir=~/logs`, which the shell leaves) was a directory
    named `~` here. A `~name` of no user stays, for log_dir_problems to refuse."""
    expanded = os.path.expanduser(cfg.log_dir)
    if expanded != cfg.log_dir:
        cfg.log_dir = expanded
    return cfg


def with_rule_problems(error: ConfigError, target: TargetHost | None = None) -> ConfigError:
    """Add the cross-field problems of the salvaged config to a parse error (fields not yet named)."""
    from pdlaunch.config.validate import validate_deployment

    if isinstance(error, ParseError) and error.partial is not None:
        reported = {field for field, _ in error.problems}
        more, _ = validate_deployment(error.partial, target)
        more = name_flags(more, error.flags)
        error.problems += [p for p in more if p[0] not in reported]
    return error


def load_valid_deployment(path: Path | None, overrides: Mapping[str, object]) -> DeploymentConfig:
    """Load, validate against this host, and resolve (sleep mode -> cumem, TP per group, device, dtype); each
    warning about it is logged.

    Raises ConfigError with every problem; the returned config is the resolved one.
    """
    resolved, warnings = checked_deployment(path, overrides)
    for field, message in warnings:
        logger.warning("warning: %s: %s", field, message)
    return resolved


def checked_deployment(path: Path | None, overrides: Mapping[str, object],
                       own: Collection[str] = ()) -> tuple[DeploymentConfig, list[Problem]]:
    """load_valid_deployment's config and its warnings, for a caller that says them itself (bench compare, which
    checks several deployments of one base config: each warning once). `own`: as in flag_over_file_warnings."""
    from pdlaunch.config.backend import backend_target, with_backend_nodes
    from pdlaunch.config.model_info import load_model_info
    from pdlaunch.config.rules.host_memory import host_memory_findings
    from pdlaunch.config.rules.no_effect import no_effect_warnings
    from pdlaunch.config.rules.rendezvous import rendezvous_timeout_warnings
    from pdlaunch.config.rules.security import world_readable_secret_warnings
    from pdlaunch.config.validate import validate_deployment

    try:
        cfg = load_deployment(path, overrides)
    except ConfigError as exc:
        exc.problems += serving_env_problems(None)  # said at once, with the config's own problems
        raise with_rule_problems(exc) from None
    cfg = with_backend_nodes(cfg)  # --backend slurm: the allocation's nodes (PdlaunchError outside one)
    problems, resolved = validate_deployment(cfg, target=backend_target(cfg))  # ray: the cluster's GPUs
    problems += serving_env_problems(resolved)
    if problems:
        raise ConfigError(name_flags(problems, flag_fields(overrides, cfg.instances)))
    info, _ = load_model_info(resolved.model.path)
    found = (no_effect_warnings(resolved, info) + rendezvous_timeout_warnings(resolved)
             + host_memory_findings(resolved, info)[1])  # ray: not this machine's
    found = name_flags(found, flag_fields(overrides, resolved.instances))
    found += serving_env_warnings(os.environ)
    return resolved, (world_readable_secret_warnings(path) + flag_over_file_warnings(path, overrides, own)
                      + role_flag_warnings(path, overrides) + found)


def example_yaml() -> str:
    """A commented deployment that validates on this machine (`pdlaunch config example`)."""
    from pdlaunch.config.example import EXAMPLE_YAML

    return EXAMPLE_YAML
