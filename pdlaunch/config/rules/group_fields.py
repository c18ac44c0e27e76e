"""Problems of a setting an instance group takes from the deployment's (a TP size from --tp or parallel.tp), named
after where the user set it, each once.

Resolution copies a deployment-wide TP size into every group (validate.resolve). A rule that checks each group finds
the same problem once per group; named `instances[i].tp`, the user who typed `--tp 3` read a field they never wrote,
the same message twice. Here each finding is named after its source (topology_config.group_tp_field), identical
ones are said once, and a message that holds for only some of the groups taking a deployment-wide value names them.
"""

from __future__ import annotations

from typing import NamedTuple

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.problems import Problem, problem


class GroupFinding(NamedTuple):
    """A rule's finding for group `group` of the config, about the value it takes from `field`."""

    group: int
    field: str
    what: str
    hint: str


def _own(field: str) -> bool:
    return field.startswith("instances[")


def by_source(cfg: DeploymentConfig, findings: list[GroupFinding], sources: list[str]) -> list[Problem]:
    """One problem per distinct (field, message), in the findings' order. `sources[i]`: the field group i takes the
    value from. A finding on a deployment-wide field that not every running group taking it has (count > 0) says which
    groups it is about."""
    takers: dict[str, set[int]] = {}
    for i, (group, field) in enumerate(zip(cfg.instances, sources)):
        if group.count > 0:
            takers.setdefault(field, set()).add(i)
    groups_of: dict[tuple[str, str, str], list[int]] = {}
    for finding in findings:
        groups_of.setdefault((finding.field, finding.what, finding.hint), []).append(finding.group)
    problems: list[Problem] = []
    for (field, what, hint), groups in groups_of.items():
        if not _own(field) and not takers.get(field, set()) <= set(groups):
            named = ", ".join(f"instances[{g}] ({cfg.instances[g].role})" for g in dict.fromkeys(groups))
            what = f"{named}: {what}"
        problems.append(problem(field, what, hint))
    return problems
