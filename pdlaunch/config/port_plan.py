"""The port plan: every instance's TP ranks placed on nodes, and the fixed ports its processes bind.

`plan_instances` is the one source of it: check-config reports its ranges and their collisions
(config/rules/resources.py) and the launcher claims exactly these ports (launcher/plan.py).

Instances are named per role across groups (config/instance_names.py: decode-0, decode-1 for two decode
groups of one), while ports and devices are per group, by the instance's place k in its group:

- proxy.port: on node 0.
- HTTP: instance k of group i with base_port b uses b + k on the group's node.
- KV side channel, kv_transfer.side_channel_port s: on each node, one port per TP rank placed on that
  node, s, s+1, ... in group order (instance by instance, rank by rank). A TP group spanning nodes
  takes ports on every node that hosts one of its ranks, not only on its own.
  None with the storage connector, which opens no side channel.
- Rendezvous, parallel.master_port m: the n-th instance with TP > 1 whose rank 0 is on a node uses
  m + n on that node (n from 0).
A port left unset is picked free by the launcher (None here) and cannot collide.

The nodes ranks run on, and so every port above, come from the config alone (config/placement.py): each
node's launcher, check-config and the `--backend slurm` batch process compute the same plan whatever GPUs
their machines have. Only the CUDA indices of a one-node plan, and of this node's ranks, are this machine's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.instance_names import instance_name, role_numbers
from pdlaunch.config.placement import PlacedRank, node_pool, place_group
from pdlaunch.config.topology_config import InstanceGroupConfig
from pdlaunch.errors import PdlaunchError


@dataclass
class SideChannelPorts:
    """The side-channel ports of one instance's ranks on one node: ranks[i] binds first + i."""

    node: int
    ranks: list[int]  # TP ranks, ascending
    first: int | None  # None: picked free (a consecutive range) by that node's launcher


@dataclass
class PlannedInstance:
    group: int  # index into cfg.instances
    number: int  # the instance's number among the deployment's instances of its role (its name's)
    role: str
    node: int  # the group's node, where rank 0 (the instance's HTTP server) runs
    ranks: list[PlacedRank]  # ranks[r]: TP rank r's node and device
    http_port: int | None  # None: picked free
    side_channels: list[SideChannelPorts]  # one per node hosting ranks; none for a colocated instance
    rendezvous_index: int | None  # n-th instance with TP > 1 on its node; None for TP 1
    rendezvous_port: int | None  # parallel.master_port + rendezvous_index; None: picked free or TP 1

    @property
    def name(self) -> str:
        return instance_name(self.role, self.number)

    @property
    def rank_nodes(self) -> list[int]:
        return [rank.node for rank in self.ranks]

    @property
    def spans_nodes(self) -> bool:
        return len(set(self.rank_nodes)) > 1


def plan_instances(cfg: DeploymentConfig, cuda_devices: list[int], strict: bool = True) -> list[PlannedInstance]:
    """Every instance of `cfg`, in group order. `cuda_devices`: this machine's CUDA indices ([] on CPU, or
    when only nodes and ports matter), the devices of a one-node deployment (placement.node_pool). strict: a
    spanning group the nodes cannot host raises PdlaunchError; otherwise (check-config, which reports it as a
    device problem) its ranks stay on its node."""
    pools = {k: node_pool(cfg, k, cuda_devices) for k in range(max(1, len(cfg.parallel.nodes)))}
    used_devices: dict[int, int] = {}  # node -> devices (rank slots on CPU) taken so far
    side_offsets: dict[int, int] = {}  # node -> side-channel ports taken so far
    rendezvous: dict[int, int] = {}  # node -> instances with TP > 1 whose rank 0 is there
    planned: list[PlannedInstance] = []
    numbers = role_numbers(cfg.instances)
    for g, group in enumerate(cfg.instances):
        tp = group.tp or 1
        for k in range(group.count):
            ranks = _place(cfg, g, group, k, used_devices, pools, strict)
            rank_index = None
            if tp > 1:
                rank_index = rendezvous.get(group.node, 0)
                rendezvous[group.node] = rank_index + 1
            master = cfg.parallel.master_port
            planned.append(PlannedInstance(
                group=g, number=numbers[g][k], role=group.role, node=group.node, ranks=ranks,
                http_port=None if group.base_port is None else group.base_port + k,
                side_channels=_side_channels(cfg, group.role, ranks, side_offsets),
                rendezvous_index=rank_index,
                rendezvous_port=None if rank_index is None or master is None else master + rank_index))
    return planned


def _place(cfg: DeploymentConfig, g: int, group: InstanceGroupConfig, k: int, used: dict[int, int],
           pools: dict[int, Sequence[int] | None], strict: bool) -> list[PlacedRank]:
    """Instance k's ranks, always tp of them: ranks without a device (a full node) keep device None."""
    tp = group.tp or 1
    if group.devices is not None:
        placed = [PlacedRank(group.node, d) for d in group.devices[k * tp:(k + 1) * tp]]
    elif group.node not in pools:  # a node index past parallel.nodes: rules/roles.py node_problems reports it
        placed = []
    else:
        try:
            placed = place_group(cfg, g, used, pools)
        except PdlaunchError:
            if strict:
                raise
            placed = []
    return placed + [PlacedRank(group.node, None) for _ in range(tp - len(placed))]


def _side_channels(cfg: DeploymentConfig, role: str, ranks: list[PlacedRank],
                   offsets: dict[int, int]) -> list[SideChannelPorts]:
    """One range per node hosting ranks, in node order; offsets advance even for a colocated instance. None with
    the storage connector: it moves KV through files and opens no side channel."""
    if cfg.kv_transfer.connector == "storage":
        return []
    base = cfg.kv_transfer.side_channel_port
    found: list[SideChannelPorts] = []
    for node in sorted({rank.node for rank in ranks}):
        here = [r for r, rank in enumerate(ranks) if rank.node == node]
        offset = offsets.get(node, 0)
        offsets[node] = offset + len(here)
        if role != "colocated":
            found.append(SideChannelPorts(node, here, None if base is None else base + offset))
    return found
