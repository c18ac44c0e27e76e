"""Whether the whole deployment fits the Ray cluster, not only each instance alone (config/ray_cluster.py checks
that): every instance's placement group, as the Ray backend asks for them (`deployment_placements`, which
launcher/backends/ray_deployment.py places), added up.

- a problem when the live nodes could never hold them all, even idle: for some resource, the instances need more in
  all than the cluster has in all, or than the nodes that can hold their bundles have (a role pinned with
  launcher.ray_resources lands only on the nodes with that resource, so roles pinned to the same nodes are added up
  together); or a role's bundles outnumber the bundles of that shape the nodes hold (a bundle is never split across
  nodes). Caught here, not by serve waiting out launcher.ray_placement_timeout_seconds for the instance left over.
- a warning when the cluster has less free now than the deployment needs in all (other jobs or actors hold the
  rest): serve may then wait that timeout and stop.

These are conditions every placement meets, not a full packing: bundles of different roles that add up right and
still pack wrong (each fits, and together they leave a node half used) pass here and are named by serve's placement
timeout (launcher/backends/ray_unplaced.py). What is free is read for the cluster as a whole
(ray.available_resources), not node by node: the warning is a hint, the problem is certain.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from pdlaunch.config import ray_cluster
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.ray_cluster import (
    NODES_TIMEOUT_S,
    InstancePlacement,
    RayNode,
    bundle_slots,
    fmt_resources,
    plan_instance,
)
from pdlaunch.config.ray_thread import in_ray_thread
from pdlaunch.config.strict_model import Role
from pdlaunch.errors import PdlaunchError

FIELD = "instances"
EPSILON = 1e-6  # Ray keeps amounts to 1/10000 of a unit; sums of fractions (0.01 per rank) drift far below that
HINT = ("add nodes with those resources to the cluster (`ray start --address HEAD:PORT`, with `--resources` for a "
        "pinned role), or lower the instance counts or TP sizes, or pin roles to other nodes (launcher.ray_resources)")


@dataclass(frozen=True)
class RoleNeed:
    """What every instance of one role asks of the cluster: `bundles` bundles of one shape (`bundle`)."""

    role: Role
    bundle: dict[str, float]
    instances: int
    bundles: int

    def describe(self) -> str:
        per = self.bundles // self.instances
        return f"{self.role}: {self.instances} instance(s) of {per} bundle(s) of {fmt_resources(self.bundle)}"


def deployment_placements(cfg: DeploymentConfig, nodes: list[RayNode]) -> list[tuple[int, InstancePlacement]]:
    """Every instance's placement group, in the order the launcher plans the instances (group by group, `count` of
    each), with the index of its group: what the Ray backend asks Ray for."""
    from pdlaunch.config.validate import group_tp

    return [(i, plan_instance(cfg, group.role, group_tp(cfg, group), nodes))
            for i, group in enumerate(cfg.instances) for _ in range(group.count)]


def role_needs(placements: list[tuple[int, InstancePlacement]]) -> list[RoleNeed]:
    """The placements summed role by role (every bundle of a role has the same shape: ray_cluster.bundle)."""
    needs: dict[Role, RoleNeed] = {}
    for _, placement in placements:
        seen = needs.get(placement.role)
        needs[placement.role] = RoleNeed(placement.role, placement.bundles[0],
                                         (seen.instances if seen else 0) + 1,
                                         (seen.bundles if seen else 0) + len(placement.bundles))
    return list(needs.values())


def total_need(needs: tuple[RoleNeed, ...] | list[RoleNeed]) -> dict[str, float]:
    """Every resource the roles' bundles ask for, summed."""
    total: dict[str, float] = {}
    for need in needs:
        for name, amount in need.bundle.items():
            total[name] = total.get(name, 0.0) + amount * need.bundles
    return total


def _holds(node: RayNode, one: dict[str, float]) -> bool:
    return all(node.resources.get(name, 0.0) >= amount for name, amount in one.items())


def _short(asked: dict[str, float], nodes: list[RayNode], skip: set[str]) -> dict[str, float]:
    """What `nodes` have in all of each resource of `asked` they have less of (those in `skip` left out)."""
    have = {name: sum(n.resources.get(name, 0.0) for n in nodes) for name in asked if name not in skip}
    return {name: amount for name, amount in have.items() if asked[name] > amount + EPSILON}


def _resource_problems(needs: list[RoleNeed], nodes: list[RayNode]) -> list[tuple[set[Role], str]]:
    """Each resource some roles need more of than the cluster has (or the nodes that can hold those roles' bundles),
    named once (with the roles it names): the whole deployment first, then fewer roles together."""
    problems: list[tuple[set[Role], str]] = []
    named: set[str] = set()
    for size in range(len(needs), 0, -1):
        for roles in combinations(needs, size):
            asked = total_need(roles)
            what = "; ".join(need.describe() for need in roles)
            short = _short(asked, nodes, named)
            where = "the cluster has"
            if not short:  # the cluster has enough; the nodes these roles can go to may not
                hosts = [n for n in nodes if any(_holds(n, need.bundle) for need in roles)]
                short = _short(asked, hosts, named)
                where = f"the live node(s) that can hold their bundles ({', '.join(n.address for n in hosts)}) have"
            if short:
                named.update(short)
                needed = fmt_resources({k: asked[k] for k in short})
                who = ("the deployment's" if size == len(needs)
                       else "its " + " and ".join(need.role for need in roles)) + " instances"
                problems.append(({need.role for need in roles}, f"{who} need {needed} in all "
                                 f"({what}), and {where} {fmt_resources(short)} in all: it can never be placed, and "
                                 "serve would wait out launcher.ray_placement_timeout_seconds for it"))
    return problems


def fit_problems(cfg: DeploymentConfig, nodes: list[RayNode]) -> list[tuple[str, str]]:
    """Why the live nodes, idle, could never hold every instance of `cfg` at once (empty when they may)."""
    needs = role_needs(deployment_placements(cfg, nodes))
    found = _resource_problems(needs, nodes)
    problems = [(FIELD, text) for _, text in found]
    named = {role for roles, _ in found for role in roles}  # a role short of a resource is not named twice
    for need in needs:
        slots = bundle_slots(need.bundle, nodes)
        if slots < need.bundles and need.role not in named:
            problems.append((FIELD, f"the live nodes hold {slots} bundle(s) of {fmt_resources(need.bundle)} in all "
                             f"(a bundle is never split across nodes), and the {need.role} instances need "
                             f"{need.bundles} ({need.describe()}): the deployment can never be placed"))
    return problems


def refuse_unfit(cfg: DeploymentConfig, nodes: list[RayNode]) -> None:
    """PdlaunchError (field `instances`) naming every reason the live nodes could never hold the whole deployment."""
    problems = fit_problems(cfg, nodes)
    if problems:
        more = "; also ".join(text for _, text in problems[1:])
        raise PdlaunchError(problems[0][1] + (f"; also {more}" if more else ""), field=FIELD, hint=HINT)


def free_warnings(cfg: DeploymentConfig) -> list[Problem]:
    """A warning when the cluster has less free now than every instance of `cfg` needs: serve may wait out
    launcher.ray_placement_timeout_seconds for room others hold. Nothing when the cluster does not say in time."""
    late = PdlaunchError(f"the Ray cluster did not say its free resources within {NODES_TIMEOUT_S:.0f}s")
    try:
        ray = ray_cluster.connect(cfg)  # connected already: the config was checked against the cluster
        nodes = ray_cluster.live_nodes(ray)
        answer = in_ray_thread(ray, ray.available_resources, "reading the Ray cluster's free resources",
                               NODES_TIMEOUT_S, late)
    except PdlaunchError:  # the head is slow to answer: the verdict stands, this hint is left out
        return []
    asked = total_need(role_needs(deployment_placements(cfg, nodes)))
    free = {str(k): float(v) for k, v in dict(answer or {}).items() if isinstance(v, (int, float))}
    short = {name: free.get(name, 0.0) for name in asked if asked[name] > free.get(name, 0.0) + EPSILON}
    if not short:
        return []
    total = {name: sum(n.resources.get(name, 0.0) for n in nodes) for name in short}
    timeout = cfg.launcher.ray_placement_timeout_seconds
    return [problem(FIELD, f"the deployment's instances need {fmt_resources({k: asked[k] for k in short})} in all, "
                    f"and the Ray cluster has {fmt_resources(short)} free now, of {fmt_resources(total)} in all: other "
                    "jobs or actors hold the rest, and serve waits up to launcher.ray_placement_timeout_seconds "
                    f"({timeout:g}s) for an instance that finds no room, then stops",
                    "free room on the cluster (`ray status` shows what holds it), or serve once it is free")]
