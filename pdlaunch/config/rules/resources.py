"""Ports and devices a deployment claims, and the collisions/over-subscription among them.

Ports: the ranges of the port plan (config/port_plan.py, the plan the launcher starts from), which
collide only on the same node. Devices: a GPU may be listed by several instances only when their
gpu_memory_utilization shares fit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

from pdlaunch.config.addresses import port_is_free
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.placement import first_rank_error, unplaced_error
from pdlaunch.config.port_plan import plan_instances
from pdlaunch.config.port_reservations import reservation_holder
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.rules.group_fields import GroupFinding, by_source
from pdlaunch.config.rules.roles import tp_sources
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


def port_plan(cfg: DeploymentConfig) -> list[PortRange]:
    """Every fixed port range of the (resolved) deployment. A TP group larger than its node's listed devices
    spans the nodes after it; no range depends on this machine's GPUs (config/port_plan.py)."""
    plan = [PortRange("proxy.port", 0, cfg.proxy.port, 1, "proxy")]
    instances = plan_instances(cfg, [], strict=False)
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
    if side is not None and not cfg.colocated and cfg.kv_transfer.connector != "storage":  # storage: no side channel
        ranks = Counter(rank.node for i in instances for rank in i.ranks)
        plan += [PortRange("kv_transfer.side_channel_port", node, side, count, "side channel")
                 for node, count in sorted(ranks.items()) if count > 0]
    return plan


def port_problems(cfg: DeploymentConfig) -> list[Problem]:
    """Ports in 1..65535 and no two ranges overlapping on one node."""
    problems: list[Problem] = []
    valid: list[PortRange] = []
    for used in port_plan(cfg):
        if used.first < 1 or used.last > 65535:
            problems.append(problem(used.field, f"{used.label()} is outside 1..65535",
                                    "choose ports inside 1..65535, e.g. 8000-20000"))
            continue
        for other in valid:
            if other.node == used.node and used.first <= other.last and other.first <= used.last:
                verb = "collides" if used.count == 1 else "collide"
                problems.append(problem(used.field, f"{used.label()} {verb} with {other.field} {other.label()}"
                                        + (f" on node {used.node}" if cfg.parallel.nodes else ""),
                                        "move one of them; a group uses base_port..base_port+count-1"))
                break
        valid.append(used)
    return problems



def busy_port_warnings(cfg: DeploymentConfig) -> list[Problem]:
    """Fixed ports this machine's node would bind that something else holds now: `pdlaunch serve` stops at
    the first. A warning, not a problem: the config is right and the port may be freed before it starts
    (check-config is also run next to a deployment that still serves). Addresses that are not this
    machine's are skipped (another node's ports, or a bad address bind_problem reports). Each port is tested on the
    address its server binds: the proxy's on proxy.host, the KV side channel's on kv_transfer.side_channel_host,
    the others on the node's address. A port another
    deployment's launcher holds (config/port_reservations.py: it is starting, its children not bound yet) is
    in use too."""
    warnings: list[Problem] = []
    for used in port_plan(cfg):
        if used.node != cfg.parallel.node_rank or used.first < 1 or used.last > 65535:
            continue
        host = {"proxy.port": cfg.proxy.host, "kv_transfer.side_channel_port": cfg.kv_transfer.side_channel_host}.get(
            used.field, cfg.parallel.nodes[used.node].address if cfg.parallel.nodes else "127.0.0.1")
        try:
            busy = [port for port in range(used.first, used.last + 1)
                    if not port_is_free(host, port) or reservation_holder(host, port) is not None]
        except PdlaunchError:
            continue
        if busy:
            ports = ", ".join(map(str, busy[:5])) + (f" and {len(busy) - 5} more" if len(busy) > 5 else "")
            warnings.append(problem(used.field, f"{used.label()} on {host}: {ports} in use now, so `pdlaunch "
                                    "serve` would stop there", "stop what holds it or choose another port"))
    return warnings

def _node_capacity(cfg: DeploymentConfig, visible_gpus: int, checked: Collection[int]) -> list[list[int] | None]:
    """The CUDA device indices usable on each node: the node's listed `devices`; else, on a node whose GPUs
    `visible_gpus` counts (`checked`), those; else None: unknown here, that node's own launcher checks them."""
    if not cfg.parallel.nodes:
        return [list(range(visible_gpus))]
    return [list(node.devices) if node.devices else list(range(visible_gpus)) if k in checked else None
            for k, node in enumerate(cfg.parallel.nodes)]


def _listed_device_problems(cfg: DeploymentConfig, visible_gpus: int, where: str,
                            checked: Collection[int]) -> list[Problem]:
    """A checked node's listed `devices` exist there: the plan places ranks on them."""
    problems: list[Problem] = []
    for k, node in enumerate(cfg.parallel.nodes):
        missing = [dev for dev in node.devices if dev >= visible_gpus]
        if k in checked and missing:
            problems.append(problem(f"parallel.nodes[{k}].devices", f"lists GPU(s) {missing} but {where} has "
                                    f"{visible_gpus} (CUDA devices {_indices(visible_gpus)})",
                                    f"list only node {k}'s GPUs"))
    return problems


def _indices(count: int) -> str:
    return "none" if count == 0 else "0" if count == 1 else f"0-{count - 1}"


def _explicit_device_problems(cfg: DeploymentConfig, capacity: list[list[int] | None], where: str,
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
        problems += _rank_sharing_problems(field, group.devices, tp)
        for dev in group.devices:
            known = capacity[node]
            if known is not None and dev not in known:
                has = (f"parallel.nodes[{node}].devices lists {known}" if cfg.parallel.nodes
                       and cfg.parallel.nodes[node].devices else f"{where} has {known}")
                problems.append(problem(field, f"device {dev} does not exist on node {node} ({has})",
                                        "use indices of that node's GPUs"))
            else:
                users.setdefault((node, dev), []).append(i)
    return problems


def _rank_sharing_problems(field: str, devices: list[int], tp: int) -> list[Problem]:
    """Two TP ranks of one instance (tp consecutive entries of a group's `devices`) on one GPU: NCCL refuses a
    communicator with two ranks on one device, so the instance would fail at start. Instances may share a GPU."""
    for k in range(0, len(devices) - tp + 1 if tp > 1 else 0, tp):
        ranks = devices[k:k + tp]
        shared = next((dev for dev in ranks if ranks.count(dev) > 1), None)
        if shared is not None:
            return [problem(field, f"instance {k // tp} of the group lists GPU {shared} for {ranks.count(shared)} of "
                            f"its TP ranks ({ranks}): NCCL refuses two ranks of one TP group on one GPU",
                            "give each TP rank of an instance its own GPU (different instances may share one, with "
                            "gpu_memory_utilization at most 1/sharers)")]
    return []


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


def _spanned(cfg: DeploymentConfig, node: int, tp: int) -> list[int]:
    """The nodes a group of TP `tp` on `node` places ranks on (config/placement.py): its node alone, unless it
    lists fewer devices than tp; then the nodes after it too, up to the first that lists none (it holds the rest)
    or the last."""
    nodes = cfg.parallel.nodes
    if not nodes or not nodes[node].devices or tp <= len(nodes[node].devices):
        return [node]
    spanned = [node]
    for k in range(node + 1, len(nodes)):
        spanned.append(k)
        if not nodes[k].devices:
            break
    return spanned


def device_problems(cfg: DeploymentConfig, visible_gpus: int, where: str, checked: Collection[int]) -> list[Problem]:
    """Explicit device lists are valid (sharing a GPU only if the memory shares fit); count*tp per node
    fits the node's GPUs.

    `visible_gpus`: the GPUs of each node in `checked` that lists no devices, and the count its listed devices
    are checked against (this host's, or the declared target's); `where` names them in messages. Another node's
    GPUs are unknown here (its own launcher checks them). A TP group larger than its node's listed devices
    spans the nodes after it (multi-node only), each instance from its own node, where rank 0 runs (refused when
    no GPU is left there: placement.first_rank_error); a node that lists none holds every rank placed on it. A group
    that lists no devices takes the GPUs no group on its node lists: running out of those is reported on its
    `devices` field with the GPUs taken, in the launcher's words (config/placement.py unplaced_error).
    """
    capacity = _node_capacity(cfg, visible_gpus, checked)
    users: dict[tuple[int, int], list[int]] = {}
    problems = _listed_device_problems(cfg, visible_gpus, where, checked)
    problems += _explicit_device_problems(cfg, capacity, where, users)
    problems += _sharing_problems(cfg, users)
    demand = [len({dev for (n, dev) in users if n == k}) for k in range(len(capacity))]
    short: set[int] = set()  # nodes where a group listing no devices ran out of the GPUs no group lists
    sources = tp_sources(cfg)
    too_few: list[GroupFinding] = []  # TP sizes the GPUs cannot hold: named after where the TP size was set
    for i, group in enumerate(cfg.instances):
        tp, node = group.tp or 1, group.node
        if group.devices is not None or node >= len(capacity) or group.count == 0:
            continue
        one_node = capacity[0] if not cfg.parallel.nodes else None
        if one_node is not None and tp > len(one_node):
            too_few.append(GroupFinding(i, sources[i], f"TP {tp} needs more GPUs than this deployment has "
                                        f"({len(one_node)} on {where})", "lower the TP size, or list parallel.nodes "
                                        "so that a group larger than a node spans the nodes after it"))
            continue
        spanned = _spanned(cfg, node, tp)
        listed = [len(cfg.parallel.nodes[k].devices) for k in spanned] if cfg.parallel.nodes else [0]
        if not listed[0] or tp <= listed[0]:  # on its node alone
            demand[node] += group.count * tp
            cap = capacity[node]
            if cap is not None and demand[node] > len(cap) and node not in short \
                    and any(n == node for n, _ in users):  # it runs out of the GPUs no group lists
                short.add(node)
                has = (f"parallel.nodes[{node}].devices lists {cap}" if cfg.parallel.nodes
                       and cfg.parallel.nodes[node].devices else f"{where} has {len(cap)} GPU(s)")
                err = unplaced_error(cfg, i, cap, has)
                problems.append(problem(f"instances[{i}].devices", err.message, err.hint or ""))
            continue
        if all(listed) and sum(listed) < tp:  # no node that lists none takes the rest
            too_few.append(GroupFinding(i, sources[i], f"TP {tp} needs more GPUs than nodes {node}..{spanned[-1]} "
                                        f"have together ({sum(listed)} listed in their devices); a group larger "
                                        "than its node spans the nodes after it", "lower the TP size, or add "
                                        "nodes/devices after the group's node"))
            continue
        # Each instance's ranks fill its node's GPUs first, then the next node's; the last node takes what is left.
        # Rank 0 runs on the group's node: an instance that finds no GPU left there is refused (as the launcher does).
        for _ in range(group.count):
            if listed[0] <= demand[node]:
                err = first_rank_error(cfg, i)
                problems.append(problem(err.field or f"instances[{i}].tp", err.message, err.hint or ""))
                break
            left = tp
            for k, count in zip(spanned[:-1], listed):
                take = max(0, min(left, count - demand[k]))
                demand[k] += take
                left -= take
            demand[spanned[-1]] += left
    problems += by_source(cfg, too_few, sources)
    for k, cap in enumerate(capacity):
        if cap is not None and demand[k] > len(cap) and k not in short:
            problems.append(_over_capacity(cfg, k, demand[k], len(cap), where))
    return problems


def _over_capacity(cfg: DeploymentConfig, node: int, demand: int, have: int, where: str) -> Problem:
    if cfg.parallel.nodes and not cfg.parallel.nodes[node].devices:
        return problem(f"parallel.nodes[{node}].devices", f"node {node} needs {demand} GPUs (count x tp summed over "
                       f"the ranks placed on it) but {where} has {have}; a node that lists no devices holds every "
                       "rank placed on it, since the other nodes' launchers cannot see its GPUs",
                       f"list node {node}'s GPUs (devices: [{', '.join(map(str, range(have)))}]) so that a TP group "
                       "larger than that spans the nodes after it; or lower --prefill/--decode or TP there")
    node_name = f"node {node}" if cfg.parallel.nodes else "this deployment"
    has = f"parallel.nodes[{node}].devices lists" if cfg.parallel.nodes else f"{where} has"
    return problem("instances", f"{node_name} needs {demand} GPUs (count x tp summed over groups) but {has} "
                   f"{have}", "lower --prefill/--decode or TP; or let instances share a GPU by listing `devices` per "
                   "group with gpu_memory_utilization <= 1/sharers (examples/gpu-1p1d-single.yaml); or check for a "
                   "larger host with --target-gpus")
