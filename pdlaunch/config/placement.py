"""Where the ranks of one TP group run: which node (and device) each rank gets.

A group fits on its own node when it can; a group with more ranks than its node lists `devices` fills
that node's remaining devices first, then the next node's, and so on (a spanning group). On CPU a
node's `devices` are just rank slots.

Every node's launcher computes the same placement, so it may depend only on the config: a node of
`parallel.nodes` that lists no `devices` holds every rank placed on it (a group there never spans, and a
spanning group reaching it puts its remaining ranks there), whatever GPU count the launcher computing the
plan sees. That node's own launcher checks that it has the GPUs (config/rules/resources.device_problems).
Only a deployment of one node (no `parallel.nodes`) takes its devices from this machine.

check-config (config/port_plan.py, through config/rules/resources.py) and the launcher (launcher/plan.py)
both place ranks with these functions, so the ports and devices check-config reports are the ones
the launcher uses. How a placed rank is started lives in distributed/placement.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pdlaunch.config.deployment_config import DeploymentConfig
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
    ranks are placed on do not depend on `cuda_devices`, only the device indices of a CUDA plan do."""
    nodes = cfg.parallel.nodes
    if not nodes:
        return cuda_devices if cuda_devices else None
    if nodes[node].devices:
        return list(nodes[node].devices)
    return range(sum(group.count * (group.tp or 1) for group in cfg.instances)) if cuda_devices else None


def place_group(cfg: DeploymentConfig, node: int, tp: int, used: dict[int, int],
                pool_of: Mapping[int, Sequence[int] | None], field: str) -> list[PlacedRank]:
    """The node and device of every rank of one instance placed on `node`. `used[k]` counts the
    devices of node k taken so far (updated). A group that fits its node comes back short when the
    node's devices are taken; a spanning group the nodes cannot host raises PdlaunchError."""
    pool = pool_of[node]
    if pool is None:
        return [PlacedRank(node, None) for _ in range(tp)]
    start = used.get(node, 0)
    if tp <= len(pool) or not cfg.parallel.nodes:  # fits its node: short when the node is full (caller says so)
        used[node] = start + tp
        return [PlacedRank(node, d) for d in pool[start:start + tp]]
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
        raise PdlaunchError(f"TP {tp} needs {tp} devices but nodes {node}..{len(cfg.parallel.nodes) - 1} have only "
                            f"{len(placed)} left together", field=field,
                            hint="a group spans its node and the nodes after it in parallel.nodes; lower TP or "
                            "add devices/nodes")
    return placed
