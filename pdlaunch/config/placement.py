"""Where the ranks of one TP group run: which node (and device) each rank gets.

A group fits on its own node when it can; a group with more ranks than its node lists `devices` fills
that node's remaining devices first, then the next node's, and so on (a spanning group). Each instance of
a spanning group starts on its own node, where rank 0 serves its HTTP API: when no device of that node is
left for it, the plan is refused (first_rank_error), never moved to the next node. On CPU a node's
`devices` are just rank slots.

Every node's launcher computes the same placement, so it may depend only on the config: a node of
`parallel.nodes` that lists no `devices` holds every rank placed on it (a group there never spans, and a
spanning group reaching it puts its remaining ranks there), whatever GPU count the launcher computing the
plan sees. That node's own launcher checks that it has the GPUs (config/rules/resources.device_problems).
Only a deployment of one node (no `parallel.nodes`) takes its devices from this machine.

A group that lists its own `devices` runs there (port_plan.py). A group that lists none takes, on each node,
the devices no group on that node lists, in order: two instances share a GPU only when both groups list it
(with gpu_memory_utilization at most 1/sharers, config/rules/resources.py). When too few are left, the
error names that group's `devices` and the GPUs taken (unplaced_error, which check-config and the launcher
both raise). Whether a group spans nodes depends only on how many devices its node lists.

check-config (config/port_plan.py, through config/rules/resources.py) and the launcher (launcher/plan.py)
both place ranks with these functions, so the ports and devices check-config reports are the ones
the launcher uses. How a placed rank is started lives in distributed/placement.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.topology_config import InstanceGroupConfig, group_tp_field
from pdlaunch.errors import PdlaunchError


@dataclass
class PlacedRank:
    node: int
    device: int | None  # CUDA index on that node; None on CPU


def node_pool(cfg: DeploymentConfig, node: int, cuda_devices: list[int]) -> Sequence[int] | None:
    """The devices (CUDA) or rank slots (CPU) of `node`; None: unlimited, device None (CPU).

    `cuda_devices`: this machine's CUDA indices ([] on CPU). One node: those. Several: the node's listed
    `devices`; a node listing none holds every rank placed on it: CUDA indices 0, 1, ... as many as the
    deployment has ranks (a CUDA plan, `cuda_devices` not empty), else unlimited. Either way the nodes
    ranks are placed on do not depend on `cuda_devices`, only the device indices of a CUDA plan do.
    Devices a group on `node` lists are left out: groups that list none do not take them. (The deployment's
    ranks count those groups' ranks too, so a node listing none still has an index for every rank placed
    on it.)"""
    nodes = cfg.parallel.nodes
    taken = listed_devices(cfg, node)
    if not nodes:
        return [d for d in cuda_devices if d not in taken] if cuda_devices else None
    if nodes[node].devices:
        return [d for d in nodes[node].devices if d not in taken]
    if not cuda_devices:
        return None
    ranks = sum(group.count * (group.tp or 1) for group in cfg.instances)
    return [d for d in range(ranks) if d not in taken]


def listed_devices(cfg: DeploymentConfig, node: int) -> dict[int, list[int]]:
    """Device -> the groups (indices into cfg.instances) on `node` that list it in their own `devices`."""
    taken: dict[int, list[int]] = {}
    for g, group in enumerate(cfg.instances):
        if group.devices is not None and group.count > 0 and group.node == node:
            for dev in dict.fromkeys(group.devices):
                taken.setdefault(dev, []).append(g)
    return taken


def _gpus(devices: Sequence[int]) -> str:
    return f"GPU {devices[0]}" if len(devices) == 1 else f"GPUs {', '.join(map(str, devices))}"


def _taken_text(taken: Mapping[int, list[int]]) -> str:
    """'instances[0].devices lists GPU 0; instances[1].devices and instances[2].devices list GPUs 1, 2'."""
    by_groups: dict[tuple[int, ...], list[int]] = {}
    for dev, groups in sorted(taken.items()):
        by_groups.setdefault(tuple(groups), []).append(dev)
    return "; ".join(" and ".join(f"instances[{g}].devices" for g in groups)
                     + (" lists " if len(groups) == 1 else " list ") + _gpus(devs)
                     for groups, devs in by_groups.items())


def unplaced_error(cfg: DeploymentConfig, g: int, devices: Sequence[int], has: str) -> PdlaunchError:
    """Group g lists no devices and the devices of its node (`devices`, which `has` names: "this machine has
    2 GPU(s)") that no group lists are too few for it: its field, the GPUs taken by which group, how to share."""
    group = cfg.instances[g]
    taken = {dev: groups for dev, groups in listed_devices(cfg, group.node).items() if dev in devices}
    free = [d for d in devices if d not in taken]
    on = f" on node {group.node}" if cfg.parallel.nodes else ""
    taken_part = f"; {_taken_text(taken)}" if taken else ""
    return PdlaunchError(
        f"instances[{g}] lists no devices, so its {group.count * (group.tp or 1)} GPU(s){on} come from the ones "
        f"no group lists there, in group order, and too few are left: {has}{taken_part}; that leaves "
        f"{_gpus(free) if free else 'none'} for the groups that list none", field=f"instances[{g}].devices",
        hint=f"list instances[{g}].devices: GPUs of its own, or GPUs another group lists, to share them on "
        "purpose with gpu_memory_utilization at most 1/sharers (examples/gpu-1p1d-single.yaml); or lower "
        "--prefill/--decode or TP")


def first_rank_error(cfg: DeploymentConfig, g: int) -> PdlaunchError:
    """Group g spans nodes, and the devices its node lists are all taken before one of its instances comes (by
    earlier instances placed there, or listed by groups there): that instance's rank 0 has no device on the node
    where it must run. check-config (config/rules/resources.py) and the launcher (place_group) raise this."""
    group = cfg.instances[g]
    node, tp = group.node, group.tp or 1
    devices = cfg.parallel.nodes[node].devices
    taken = {dev: groups for dev, groups in listed_devices(cfg, node).items() if dev in devices}
    taken_part = f" ({_taken_text(taken)})" if taken else ""
    return PdlaunchError(
        f"instances[{g}] has TP {tp}, more than the {len(devices)} device(s) parallel.nodes[{node}].devices lists, "
        f"so each of its instances spans from node {node} to the nodes after it, with rank 0 (which serves the "
        f"instance's HTTP API) on node {node}; but the instances placed there before one of them and the devices "
        f"groups there list{taken_part} take every device of node {node}, leaving none for its rank 0",
        field=group_tp_field(cfg.parallel, group, g),
        hint=f"list more of node {node}'s GPUs in parallel.nodes[{node}].devices, lower instances[{g}].count or its "
        f"TP, or move the group to a node with devices left (instances[{g}].node)")


def spans_nodes(cfg: DeploymentConfig, group: InstanceGroupConfig) -> bool:
    """Whether each instance of `group` places ranks past its node: it lists no `devices` of its own (one that does
    runs on those, on its node, whatever its node lists: port_plan.py) and its TP exceeds the devices its node lists
    (a node that lists none holds every rank placed on it). check-config's spanning rules (config/rules/roles.py)
    ask this; the launcher's plan spans exactly these groups (place_group)."""
    nodes = cfg.parallel.nodes
    if group.devices is not None or group.count == 0 or group.node >= len(nodes) or not nodes[group.node].devices:
        return False
    return (group.tp or 1) > len(nodes[group.node].devices)


def place_group(cfg: DeploymentConfig, g: int, used: dict[int, int],
                pool_of: Mapping[int, Sequence[int] | None]) -> list[PlacedRank]:
    """The node and device of every rank of one instance of group g (which lists no devices). `used[k]` counts
    the devices of node k taken so far (updated). A group that fits its node comes back short when the node's
    devices are taken; a spanning group the nodes cannot host, or whose node has no device left for the
    instance's rank 0, raises PdlaunchError (`used` then unchanged by this instance on its node)."""
    node, tp = cfg.instances[g].node, cfg.instances[g].tp or 1
    pool = pool_of[node]
    if pool is None:
        return [PlacedRank(node, None) for _ in range(tp)]
    start = used.get(node, 0)
    if not spans_nodes(cfg, cfg.instances[g]):  # fits its node: short when the node is full (caller says so)
        used[node] = start + tp
        return [PlacedRank(node, d) for d in pool[start:start + tp]]
    if start >= len(pool):  # rank 0 must run on the instance's node: never start it on the next one
        raise first_rank_error(cfg, g)
    placed: list[PlacedRank] = []
    for k in range(node, len(cfg.parallel.nodes)):
        k_pool = pool_of[k]
        if k_pool is None:  # a CPU node without listed slots takes every remaining rank
            placed += [PlacedRank(k, None) for _ in range(tp - len(placed))]
            break
        first = used.get(k, 0)
        take = k_pool[first:first + tp - len(placed)]
        used[k] = first + len(take)
        placed += [PlacedRank(k, d) for d in take]
        if len(placed) == tp:
            break
    if len(placed) < tp:
        raise PdlaunchError(f"instances[{g}] has TP {tp}, which needs {tp} devices, but nodes "
                            f"{node}..{len(cfg.parallel.nodes) - 1} have only {len(placed)} left together",
                            field=group_tp_field(cfg.parallel, cfg.instances[g], g),
                            hint="a group spans its node and the nodes after it in parallel.nodes; lower TP or "
                            "add devices/nodes")
    return placed
