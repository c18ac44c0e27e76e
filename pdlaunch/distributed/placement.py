"""Where the ranks of one TP group run: which node (and device) each rank gets.

A group fits on its own node when it can; a group with more ranks than its node has devices fills
that node's remaining devices first, then the next node's, and so on (a spanning group). On CPU a
node's `devices` are just rank slots: a node that lists none hosts any number of ranks.

Rank 0 of the instance (the engine process) learns the placement from the launcher through the
environment (PLACEMENT_ENV); ranks on other nodes are started by their node's launcher
(distributed/remote_rank.py) and connect to rank 0 over TCP (distributed/remote_link.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import struct
from dataclasses import dataclass

from pydantic import BaseModel

from pdlaunch.config.models import DeploymentConfig
from pdlaunch.errors import PdlaunchError

PLACEMENT_ENV = "PDLAUNCH_TP_PLACEMENT"
SECRET_ENV = "PDLAUNCH_TP_SECRET"  # optional: mixed into the rank link's authkey on every node


class RankPlacement(BaseModel):
    """One instance's ranks: `nodes[r]` is rank r's node index, `hosts[r]` that node's address."""

    nodes: list[int]
    hosts: list[str]

    @property
    def spans_nodes(self) -> bool:
        return len(set(self.nodes)) > 1

    def remote_ranks(self) -> list[int]:
        """Ranks that run on another node than rank 0 (their node's launcher starts them)."""
        return [r for r, node in enumerate(self.nodes) if node != self.nodes[0]]

    def to_env(self) -> dict[str, str]:
        return {PLACEMENT_ENV: self.model_dump_json()} if self.spans_nodes else {}

    @classmethod
    def from_env(cls) -> RankPlacement | None:
        raw = os.environ.get(PLACEMENT_ENV)
        return cls.model_validate_json(raw) if raw else None


@dataclass
class PlacedRank:
    node: int
    device: int | None  # CUDA index on that node; None on CPU


def node_pool(cfg: DeploymentConfig, node: int, cuda_devices: list[int]) -> list[int] | None:
    """The devices (CUDA) or rank slots (CPU) of `node`; None: unlimited (CPU node listing none)."""
    if cfg.parallel.nodes and cfg.parallel.nodes[node].devices:
        return list(cfg.parallel.nodes[node].devices)
    return cuda_devices if cuda_devices else None


def place_group(cfg: DeploymentConfig, node: int, tp: int, used: dict[int, int],
                pool_of: dict[int, list[int] | None], field: str) -> list[PlacedRank]:
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


def link_authkey(cfg: DeploymentConfig, instance_name: str, master_port: int) -> bytes:
    """The key rank 0 and its remote ranks prove to each other: the same on every node that parsed
    the same config (engine_ids may differ there), different per instance; PDLAUNCH_TP_SECRET, when
    set on every node, makes it unguessable for others on the network."""
    nodes = ",".join(n.address for n in cfg.parallel.nodes)
    seed = f"{os.environ.get(SECRET_ENV, '')}|{cfg.model.path}|{nodes}|{instance_name}|{master_port}"
    return hashlib.sha256(seed.encode()).digest()


_SIOCGIFADDR = 0x8915


def interface_of(address: str) -> str | None:
    """The name of this machine's network interface holding `address` (IPv4, or a name resolving
    to one), or None."""
    try:
        wanted = socket.gethostbyname(address)
    except OSError:
        return None
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:  # no IPv4 address on it
                continue
        if socket.inet_ntoa(packed[20:24]) == wanted:
            return name
    return None


def interface_env(address: str) -> dict[str, str]:
    """Gloo and NCCL pick an interface from the hostname, which may resolve to loopback: a rank of a
    spanning group must use the one holding its node's address (unless the user chose one)."""
    name = interface_of(address)
    if name is None:
        return {}
    return {var: name for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if var not in os.environ}
