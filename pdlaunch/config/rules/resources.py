"""Ports and devices a deployment claims, and the collisions/over-subscription among them.

Ports: the ranges of the port plan (config/port_plan.py, the plan the launcher starts from), which
collide only on the same node. Devices: a GPU may be listed by several instances only when their
gpu_memory_utilization shares fit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from pdlaunch.config.addresses import port_is_free
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.port_plan import plan_instances
from pdlaunch.config.problems import Problem, problem
from pdlaunch.errors import PdlaunchError


@dataclass(frozen=True)
class PortRange:
    field: str  # config path that claims the ports
    node: int
    first: int
    count: int
    what: str  # e.g. "proxy", "prefill HTTP", "side channel"

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def label(self) -> str:
        ports = f"port {self.first}" if self.count == 1 else f"ports {self.first}-{self.last}"
        return f"{ports} ({self.what})"


def port_plan(cfg: DeploymentConfig, visible_gpus: int = 0) -> list[PortRange]:
    """Every fixed port range of the (resolved) deployment. `visible_gpus`: CUDA devices of a node that
    lists none (0 on CPU); a TP group larger than its node's devices spans the nodes after it."""
    plan = [PortRange("proxy.port", 0, cfg.proxy.port, 1, "proxy")]
    instances = plan_instances(cfg, list(range(visible_gpus)), strict=False)
    master = cfg.parallel.master_port
    if master is not None:
        rendezvous = Counter(i.node for i in instances if i.rendezvous_index is not None)
        rendezvous[0] = max(1, rendezvous[0])  # node 0 reserves it even without a TP group (parallel.master_addr)
        plan += [PortRange("parallel.master_port", node, master, count, "torch.distributed rendezvous")
                 for node, count in sorted(rendezvous.items()) if count > 0]
    for i, group in enumerate(cfg.instances):
        if group.base_port is not None and group.count > 0:
            plan.append(PortRange(f"instances[{i}].base_port", group.node, group.base_port, group.count,
                                  f"{group.role} HTTP"))
    side = cfg.kv_transfer.side_channel_port
    if side is not None and not cfg.colocated:
        ranks = Counter(rank.node for i in instances for rank in i.ranks)
        plan += [PortRange("kv_transfer.side_channel_port", node, side, count, "side channel")
                 for node, count in sorted(ranks.items()) if count > 0]
    return plan


def port_problems(cfg: DeploymentConfig, visible_gpus: int = 0) -> list[Problem]:
    """Ports in 1..65535 and no two ranges overlapping on one node."""
    problems: list[Problem] = []
    valid: list[PortRange] = []
    for used in port_plan(cfg, visible_gpus):
        if used.first < 1 or used.last > 65535:
            problems.append(problem(used.field, f"{used.label()} is outside 1..65535",
                                    "choose ports inside 1..65535, e.g. 8000-20000"))
            continue
        for other in valid:
            if other.node == used.node and used.first <= other.last and other.first <= used.last:
                problems.append(problem(used.field, f"{used.label()} collides with {other.field} {other.label()}"
                                        + (f" on node {used.node}" if cfg.parallel.nodes else ""),
                                        "move one of them; a group uses base_port..base_port+count-1"))
                break
        valid.append(used)
    return problems



def busy_port_warnings(cfg: DeploymentConfig, visible_gpus: int = 0) -> list[Problem]:
    """Fixed ports this machine's node would bind that something else holds now: `pdlaunch serve` stops at
    the first. A warning, not a problem: the config is right and the port may be freed before it starts
    (check-config is also run next to a deployment that still serves). Addresses that are not this
    machine's are skipped (another node's ports, or a bad address bind_problem reports)."""
    warnings: list[Problem] = []
    for used in port_plan(cfg, visible_gpus):
        if used.node != cfg.parallel.node_rank or used.first < 1 or used.last > 65535:
            continue
        host = cfg.proxy.host if used.field == "proxy.port" else (
            cfg.parallel.nodes[used.node].address if cfg.parallel.nodes else "127.0.0.1")
        try:
            busy = [port for port in range(used.first, used.last + 1) if not port_is_free(host, port)]
        except PdlaunchError:
            continue
        if busy:
            ports = ", ".join(map(str, busy[:5])) + (f" and {len(busy) - 5} more" if len(busy) > 5 else "")
            warnings.append(problem(used.field, f"{used.label()} on {host}: {ports} in use now, so `pdlaunch "
                                    "serve` would stop there", "stop what holds it or choose another port"))
    return warnings

def _node_capacity(cfg: DeploymentConfig, visible_gpus: int) -> list[list[int]]:
    """The CUDA device indices usable on each node."""
    if not cfg.parallel.nodes:
        return [list(range(visible_gpus))]
    return [node.devices or list(range(visible_gpus)) for node in cfg.parallel.nodes]


def _explicit_device_problems(cfg: DeploymentConfig, capacity: list[list[int]], where: str,
                              users: dict[tuple[int, int], list[int]]) -> list[Problem]:
    """Explicit lists: count*tp long, indices on the node. Fills `users`: (node, device) -> group indices."""
    problems: list[Problem] = []
    for i, group in enumerate(cfg.instances):
        if group.devices is None or group.count == 0 or group.node >= len(capacity):
            continue  # a bad node index is reported by node_problems
        field, tp, node = f"instances[{i}].devices", group.tp or 1, group.node
        if len(group.devices) != group.count * tp:
            problems.append(problem(field, f"{len(group.devices)} devices for {group.count} instance(s) of TP {tp}",
                                    f"list exactly count*tp = {group.count * tp} device indices"))
        for dev in group.devices:
            if dev not in capacity[node]:
                problems.append(problem(field, f"device {dev} does not exist on node {node} ({where} has "
                                        f"{capacity[node]})", "use indices of that node's GPUs"))
            else:
                users.setdefault((node, dev), []).append(i)
    return problems


def _sharing_problems(cfg: DeploymentConfig, users: dict[tuple[int, int], list[int]]) -> list[Problem]:
    """A GPU listed by several instances is fine only if their memory shares fit in it together."""
    problems: list[Problem] = []
    util = cfg.cache.gpu_memory_utilization
    for (node, dev), groups in sorted(users.items()):
        if len(groups) < 2:
            continue
        field = f"instances[{groups[-1]}].devices"
        if len(groups) * util > 1.0 + 1e-9:
            problems.append(problem(field, f"GPU {dev} on node {node} is listed {len(groups)} times (groups "
                                    f"{sorted(set(groups))}) and {len(groups)} x gpu_memory_utilization {util} > 1",
                                    f"give each instance its own GPU, or set --gpu-memory-utilization "
                                    f"{int(100 / len(groups)) / 100} or less"))
        roles = {cfg.instances[g].role for g in groups}
        if {"prefill", "decode"} <= roles and cfg.kv_transfer.transfer_mode == "pull" and not cfg.colocated:
            problems.append(problem("kv_transfer.transfer_mode", f"pull between prefill and decode on the same GPU "
                                    f"{dev} fails (UCX disables cuda_ipc GET without NVLink)",
                                    "use --transfer-mode push or auto"))
    return problems


def device_problems(cfg: DeploymentConfig, visible_gpus: int, where: str) -> list[Problem]:
    """Explicit device lists are valid (sharing a GPU only if the memory shares fit); count*tp per node
    fits the node's GPUs.

    `visible_gpus`: GPUs per node (this host's, or the declared target's); `where` names them in messages.
    A TP group larger than its node spans the nodes after it (multi-node only).
    """
    capacity = _node_capacity(cfg, visible_gpus)
    users: dict[tuple[int, int], list[int]] = {}
    problems = _explicit_device_problems(cfg, capacity, where, users)
    problems += _sharing_problems(cfg, users)
    demand = [len({dev for (n, dev) in users if n == k}) for k in range(len(capacity))]
    for i, group in enumerate(cfg.instances):
        tp, node = group.tp or 1, group.node
        if group.devices is not None or node >= len(capacity) or group.count == 0:
            continue
        if tp <= len(capacity[node]):
            demand[node] += group.count * tp
            continue
        # A group larger than its node spans it and the nodes after it (distributed/placement.py):
        # its ranks fill its node's GPUs first, then the next node's.
        spanned = range(node, len(capacity)) if cfg.parallel.nodes else range(node, node + 1)
        if sum(len(capacity[k]) for k in spanned) < tp:
            have = sum(len(capacity[k]) for k in spanned)
            where_nodes = f"nodes {node}..{spanned[-1]} have together" if cfg.parallel.nodes else "this deployment has"
            problems.append(problem(f"instances[{i}].tp", f"TP {tp} needs more GPUs than {where_nodes} ({have} on "
                                    f"{where}); a group larger than its node spans the nodes after it",
                                    "lower the TP size, or add nodes/devices after the group's node"))
            continue
        left = group.count * tp
        for k in spanned:
            take = min(left, len(capacity[k]) - demand[k]) if k != spanned[-1] else left
            demand[k] += max(0, take)
            left -= max(0, take)
    for k, cap in enumerate(capacity):
        if demand[k] > len(cap):
            node_name = f"node {k}" if cfg.parallel.nodes else "this deployment"
            problems.append(problem("instances", f"{node_name} needs {demand[k]} GPUs (count x tp summed over groups) "
                                    f"but {where} has {len(cap)}",
                                    "lower --prefill/--decode or TP; or let instances share a GPU by listing "
                                    "`devices` per group with gpu_memory_utilization <= 1/sharers "
                                    "(examples/gpu-1p1d-single.yaml); or check for a larger host with --target-gpus"))
    return problems
