"""The ports of an instance group's pods in `pdlaunch render kubernetes`, and the ports Kubernetes would refuse.

Ports come from the port plan (config/port_plan.py): a group's HTTP port is its instance 0's, the KV
side channel's and the rendezvous' are the plan's first ones. Every instance is a pod of its own
(its own address), so all replicas of a group bind the same ports; ports the config leaves to be
picked free get the fixed defaults below, as a pod must declare them. A group the plan gives no side
channel (colocated, or the storage connector, which moves KV through files) has none.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.port_plan import PlannedInstance, plan_instances
from pdlaunch.config.problems import Problem, problem

DEFAULT_HTTP_PORT = 8100  # group g: 8100 + 100 * g, when base_port is unset
DEFAULT_SIDE_CHANNEL_PORT = 5600
DEFAULT_MASTER_PORT = 29500


@dataclass
class GroupPorts:
    http: int
    side_channel: int | None  # first KV side-channel port; None: the group opens none (colocated, storage)
    master: int


def group_ports(cfg: DeploymentConfig, g: int, planned: list[PlannedInstance]) -> GroupPorts:
    first = planned[0]
    side: int | None = None
    if first.side_channels:  # none planned: no side channel at all, not one picked free
        side = next((s.first for s in first.side_channels if s.first is not None), DEFAULT_SIDE_CHANNEL_PORT)
    return GroupPorts(
        http=first.http_port if first.http_port is not None else DEFAULT_HTTP_PORT + 100 * g,
        side_channel=side,
        master=first.rendezvous_port if first.rendezvous_port is not None else
        cfg.parallel.master_port or DEFAULT_MASTER_PORT)


def pod_port_problems(cfg: DeploymentConfig, gpus_per_node: int) -> list[Problem]:
    """Ports the pods declare outside 1..65535, or twice in a leader pod (a group's HTTP port on its KV
    side channel's or rendezvous port), named by the config field that sets them (a port set by the config
    is named before a default it collides with)."""
    fix = "choose ports inside 1..65535, e.g. 8000-20000"
    found: list[Problem] = []
    if not 1 <= cfg.proxy.port <= 65535:
        found.append(problem("proxy.port", f"port {cfg.proxy.port} (proxy) is outside 1..65535", fix))
    planned = plan_instances(cfg, [], strict=False)
    for g, group in enumerate(cfg.instances):
        if group.count == 0:
            continue
        ports = group_ports(cfg, g, [p for p in planned if p.group == g])
        tp = group.tp or 1
        in_leader = 1 if cfg.device == "cuda" and tp > gpus_per_node else tp  # ranks in the leader pod
        claimed = [  # (set by the config, field, what, every port, the leader pod's)
            (group.base_port is not None, f"instances[{g}].base_port", "HTTP", range(ports.http, ports.http + 1),
             range(ports.http, ports.http + 1))]
        if ports.side_channel is not None:  # one per TP rank, in the leader pod or in the rank's own
            claimed.append((cfg.kv_transfer.side_channel_port is not None, "kv_transfer.side_channel_port",
                            "KV side channel", range(ports.side_channel, ports.side_channel + tp),
                            range(ports.side_channel, ports.side_channel + in_leader)))
        if tp > 1:
            claimed.append((cfg.parallel.master_port is not None, "parallel.master_port", "rendezvous",
                            range(ports.master, ports.master + 1), range(ports.master, ports.master + 1)))
        claimed.sort(key=lambda c: c[0])  # defaults first
        for i, (given, field, what, used, leader) in enumerate(claimed):
            what = f"instances[{g}] {what}" + ("" if given else ", the default")
            if used[0] < 1 or used[-1] > 65535:
                found.append(problem(field, f"{_label(used)} ({what}) is outside 1..65535", fix))
                continue
            other = next((c for c in claimed[:i] if c[4][0] <= leader[-1] and leader[0] <= c[4][-1]), None)
            if other is not None:
                found.append(problem(field, f"{_label(leader)} ({what}) collides with {other[1]} ({_label(other[4])}"
                                     f"{'' if other[0] else ', the default'}) in the group's leader pods",
                                     "set the ports apart: a pod binds its HTTP port (default 8100 + 100 x group), "
                                     f"a KV side channel port per TP rank (default {DEFAULT_SIDE_CHANNEL_PORT} on) "
                                     f"and the rendezvous port (default {DEFAULT_MASTER_PORT})"))
    return found


def _label(used: range) -> str:
    return f"port {used[0]}" if len(used) == 1 else f"ports {used[0]}-{used[-1]}"
