"""Ports and devices a deployment claims, and the collisions/over-subscription among them.

Port plan (ports only collide on the same node; the proxy and the rendezvous live on node 0):
- proxy.port; parallel.master_port when set;
- group i with base_port b: its instances use b, b+1, ..., b+count-1 (HTTP);
- kv_transfer.side_channel_port s: on each node, instance after instance in group order, TP rank r of an
  instance whose ranks start at offset o uses s+o+r (one handshake port per TP rank).
Unset ports are picked free by the launcher and cannot collide.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdlaunch.config.models import DeploymentConfig
from pdlaunch.config.problems import Problem, problem


@dataclass(frozen=True)
class PortUse:
    field: str  # config path that claims the port
    node: int
    port: int
    what: str  # e.g. "proxy", "prefill-0 HTTP", "decode-1 side channel rank 0"


def port_plan(cfg: DeploymentConfig) -> list[PortUse]:
    """Every fixed port of the (resolved) deployment, in the order described in the module docstring."""
    uses = [PortUse("proxy.port", 0, cfg.proxy.port, "proxy")]
    if cfg.parallel.master_port is not None:
        uses.append(PortUse("parallel.master_port", 0, cfg.parallel.master_port, "torch.distributed rendezvous"))
    for i, group in enumerate(cfg.instances):
        if group.base_port is not None:
            for k in range(group.count):
                uses.append(PortUse(f"instances[{i}].base_port", group.node, group.base_port + k, f"{group.role}-{k} HTTP"))
    side = cfg.kv_transfer.side_channel_port
    if side is not None and not cfg.colocated:
        offsets: dict[int, int] = {}
        for group in cfg.instances:
            for k in range(group.count):
                for rank in range(group.tp or 1):
                    offset = offsets.get(group.node, 0)
                    uses.append(PortUse("kv_transfer.side_channel_port", group.node, side + offset,
                                        f"{group.role}-{k} side channel rank {rank}"))
                    offsets[group.node] = offset + 1
    return uses


def port_problems(cfg: DeploymentConfig) -> list[Problem]:
    """Ports in 1..65535 and no two uses of one port on one node."""
    problems: list[Problem] = []
    seen: dict[tuple[int, int], PortUse] = {}
    reported: set[str] = set()
    for use in port_plan(cfg):
        if not 1 <= use.port <= 65535:
            if use.field not in reported:
                reported.add(use.field)
                problems.append(problem(use.field, f"port {use.port} ({use.what}) is outside 1..65535",
                                        "choose a port (range) inside 1..65535, e.g. 8000-20000"))
            continue
        other = seen.get((use.node, use.port))
        if other is None:
            seen[(use.node, use.port)] = use
            continue
        key = f"{use.field}|{other.field}"
        if key not in reported:
            reported.add(key)
            problems.append(problem(use.field, f"port {use.port} ({use.what}) collides with {other.field} ({other.what})",
                                    "move one of them; a group uses base_port..base_port+count-1"))
    return problems


def _node_capacity(cfg: DeploymentConfig, visible_gpus: int) -> list[list[int]]:
    """The CUDA device indices usable on each node."""
    if not cfg.parallel.nodes:
        return [list(range(visible_gpus))]
    return [node.devices or list(range(visible_gpus)) for node in cfg.parallel.nodes]


def device_problems(cfg: DeploymentConfig, visible_gpus: int, where: str) -> list[Problem]:
    """Explicit device lists are valid and disjoint; count*tp per node fits the node's GPUs.

    `visible_gpus`: GPUs per node (this host's, or the declared target's); `where` names them in messages.
    An instance whose TP exceeds its node's GPUs spans the following nodes (multi-node TP).
    """
    problems: list[Problem] = []
    capacity = _node_capacity(cfg, visible_gpus)
    demand = [0] * len(capacity)
    taken: dict[tuple[int, int], str] = {}
    for i, group in enumerate(cfg.instances):
        tp, node = group.tp or 1, group.node
        if node >= len(capacity) or group.count == 0:
            continue  # a bad node index is reported by node_problems
        if group.devices is not None:
            field = f"instances[{i}].devices"
            if len(group.devices) != group.count * tp:
                problems.append(problem(field, f"{len(group.devices)} devices for {group.count} instance(s) of TP {tp}",
                                        f"list exactly count*tp = {group.count * tp} device indices"))
            for dev in group.devices:
                if dev not in capacity[node]:
                    problems.append(problem(field, f"device {dev} does not exist on node {node} ({where}: "
                                            f"{capacity[node]})", "use indices of that node's GPUs"))
                elif (node, dev) in taken:
                    problems.append(problem(field, f"device {dev} on node {node} is also used by {taken[(node, dev)]}",
                                            "give every instance its own devices"))
                else:
                    taken[(node, dev)] = f"instances[{i}]"
            demand[node] += len(group.devices)
            continue
        for _ in range(group.count):
            need, k = tp, node
            while need > 0 and k < len(capacity):
                share = need if k == node and tp <= len(capacity[node]) else min(need, len(capacity[k]))
                demand[k] += share
                need -= share
                k += 1
            if need > 0:
                problems.append(problem(f"instances[{i}].tp", f"TP {tp} needs more GPUs than node {node} onward has",
                                        "lower the TP size or add nodes"))
                break
    for k, cap in enumerate(capacity):
        if demand[k] > len(cap):
            node_name = f"node {k}" if cfg.parallel.nodes else "this deployment"
            problems.append(problem("instances", f"{node_name} needs {demand[k]} GPUs (count x tp summed over groups) "
                                    f"but {where} has {len(cap)}",
                                    "lower --prefill/--decode or TP, or declare a larger host with --target-gpus"))
    return problems
