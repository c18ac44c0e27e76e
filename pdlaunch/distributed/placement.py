"""How the ranks of one TP group, placed on nodes by config/placement.py, find each other.

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

from pydantic import BaseModel

from pdlaunch.config.deployment_config import DeploymentConfig

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


def link_authkey(cfg: DeploymentConfig, instance_name: str, master_port: int) -> bytes:
    """The key rank 0 and its remote ranks prove to each other: the same on every node that parsed
    the same config (engine_ids may differ there), different per instance. The link carries pickled
    messages, so the key must be secret: it mixes in the deployment secret, which a multi-node
    deployment must give every node (security.deployment_secret / PDLAUNCH_DEPLOYMENT_SECRET), and
    PDLAUNCH_TP_SECRET where set (the Kubernetes manifests' own Secret)."""
    nodes = ",".join(n.address for n in cfg.parallel.nodes)
    shared = cfg.security.deployment_secret or ""
    seed = f"{os.environ.get(SECRET_ENV, '')}|{shared}|{cfg.model.path}|{nodes}|{instance_name}|{master_port}"
    return hashlib.sha256(seed.encode()).digest()


_SIOCGIFADDR = 0x8915


def interface_of(address: str) -> str | None:
    """The name of this machine's network interface holding `address` (IPv4, or a name resolving
    to one), or None."""
    try:
        wanted = socket.gethostbyname(address)
    except OSError:
        return None
    return next((name for name, held in interface_addresses().items() if held == wanted), None)


def interface_addresses() -> dict[str, str]:
    """This machine's network interfaces that hold an IPv4 address: name -> address."""
    found = {}
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:  # no IPv4 address on it
                continue
        found[name] = socket.inet_ntoa(packed[20:24])
    return found


def interface_env(address: str) -> dict[str, str]:
    """Gloo and NCCL pick an interface from the hostname, which may resolve to loopback: a rank of a
    spanning group must use the one holding its node's address (unless the user chose one)."""
    name = interface_of(address)
    if name is None:
        return {}
    return {var: name for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if var not in os.environ}
