"""From a validated config to concrete processes: ports, devices, engine_ids (one InstanceSpec each).

Fixed ports follow config/resources.py's port plan (HTTP: base_port + k; side channel: per node,
instance after instance in group order, one port per TP rank); unset ones are picked free here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdlaunch.config.models import DeploymentConfig, InstanceSpec
from pdlaunch.config.rules import LOOPBACK_HOSTS, side_channel_reach_problem
from pdlaunch.distributed.placement import PlacedRank, RankPlacement, interface_env, node_pool, place_group
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.memory import platform


@dataclass
class InstancePlan:
    spec: InstanceSpec
    url: str
    local: bool  # runs on this node (else another node's launcher starts it)
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the process
    physical_devices: list[int] = field(default_factory=list)  # CUDA indices on the node (status view)
    node: int = 0  # index into parallel.nodes


@dataclass
class RemoteRankPlan:
    """A TP rank this node runs for an instance whose rank 0 is on another node (distributed/remote_rank.py)."""

    instance: str  # the instance's name
    rank: int
    spec: InstanceSpec  # the instance as this rank sees it: this node's host, its own side-channel port
    placement: RankPlacement
    env: dict[str, str] = field(default_factory=dict)
    physical_device: int | None = None

    @property
    def name(self) -> str:
        return f"{self.instance}-rank{self.rank}"


@dataclass
class DeploymentPlan:
    instances: list[InstancePlan]
    proxy_host: str
    proxy_port: int | None  # None: this node runs no proxy (node_rank > 0)
    remote_ranks: list[RemoteRankPlan] = field(default_factory=list)  # this node's ranks of other nodes' instances

    @property
    def proxy_url(self) -> str | None:
        return None if self.proxy_port is None else f"http://{_url_host(self.proxy_host)}:{self.proxy_port}"

    @property
    def local(self) -> list[InstancePlan]:
        return [i for i in self.instances if i.local]


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _node_host(cfg: DeploymentConfig, node: int) -> str:
    return cfg.parallel.nodes[node].address if cfg.parallel.nodes else "127.0.0.1"



def check_side_channel_reach(cfg: DeploymentConfig) -> None:
    """Raises PdlaunchError when prefill and decode run on different nodes and the KV side channel
    binds a loopback address (decode on the other node could not reach it)."""
    reach = side_channel_reach_problem(cfg)
    if reach is not None:
        field, message = reach
        raise PdlaunchError(message, field=field)


def _check_spanning(cfg: DeploymentConfig, g: int, name: str, role: str) -> None:
    """What a TP group spanning nodes needs beyond a group on one node."""
    if cfg.parallel.master_port is None:
        raise PdlaunchError(f"{name}'s TP group spans nodes, so every node must know its rendezvous port",
                            field="parallel.master_port", hint="set parallel.master_port (e.g. 29500) in the config")
    if role != "colocated" and not cfg.colocated and cfg.kv_transfer.connector in ("nixl", "mooncake") \
            and cfg.kv_transfer.side_channel_host in LOOPBACK_HOSTS:
        raise PdlaunchError(f"{name}'s TP group spans nodes but the KV side channel binds "
                            f"{cfg.kv_transfer.side_channel_host}: its ranks on other nodes could not be reached",
                            field="kv_transfer.side_channel_host",
                            hint="set it to 0.0.0.0: each rank then advertises its own node's address")


def _remote_rank_plan(spec: InstanceSpec, rank: int, placement: RankPlacement, placed: PlacedRank,
                      side_port: int | None) -> RemoteRankPlan:
    """Rank `rank` of `spec` as the node hosting it runs it: it advertises that node's address, its
    connector binds spec.side_channel_port + rank (so that is its planned port), and on CUDA it sees
    one device (CUDA_VISIBLE_DEVICES), index 0."""
    env: dict[str, str] = {}
    devices: list[int] = []
    if placed.device is not None and spec.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = str(placed.device)
        devices = [0] * spec.tp
    rank_spec = spec.model_copy(update={
        "host": placement.hosts[rank], "devices": devices,
        "side_channel_port": None if side_port is None else side_port - rank,
    })
    return RemoteRankPlan(instance=spec.name, rank=rank, spec=rank_spec, placement=placement, env=env,
                          physical_device=placed.device)


def instance_config(cfg: DeploymentConfig) -> DeploymentConfig:
    """The config this node's instances run with. Multi-node: each group's rendezvous store is hosted
    by its rank 0 (on every interface); ranks on its node reach it on loopback, while parallel.master_addr
    names node 0 and would send node K's ranks into node 0's stores (same master_port numbering).
    Ranks on other nodes (a spanning group) connect to the rank-0 node's address instead."""
    if not cfg.parallel.nodes or cfg.parallel.master_addr in LOOPBACK_HOSTS:
        return cfg
    parallel = cfg.parallel.model_copy(update={"master_addr": "127.0.0.1"})
    return cfg.model_copy(update={"parallel": parallel})


def plan_deployment(cfg: DeploymentConfig) -> DeploymentPlan:
    """Assign every instance its ports, devices and engine_id. Raises PdlaunchError naming the field."""
    device = platform.resolve_device(cfg.device)
    if device not in ("cpu", "cuda"):
        raise PdlaunchError(f"unknown device {device!r}", field="device", hint="use auto, cpu or cuda")
    me = cfg.parallel.node_rank
    allocators: dict[str, PortAllocator] = {}

    def ports(host: str) -> PortAllocator:
        return allocators.setdefault(host, PortAllocator(host))

    proxy_port: int | None = None
    if me == 0:
        proxy_alloc = ports(cfg.proxy.host)
        proxy_port = (proxy_alloc.free("proxy") if cfg.proxy.port == 0
                      else proxy_alloc.claim(cfg.proxy.port, "proxy.port", "proxy"))

    side_offsets: dict[int, int] = {}  # node -> next side-channel offset (resources.port_plan order)
    used_devices: dict[int, int] = {}  # node -> devices (rank slots on CPU) taken so far
    master_index: dict[int, int] = {}  # node -> next rendezvous port offset (per rank-0 node)
    cuda_pool = list(range(platform.device_count())) if device == "cuda" and platform.cuda_available() else []
    pools = {k: node_pool(cfg, k, cuda_pool if device == "cuda" else [])
             for k in range(max(1, len(cfg.parallel.nodes)))}
    plans: list[InstancePlan] = []
    remote_ranks: list[RemoteRankPlan] = []
    for g, group in enumerate(cfg.instances):
        tp = group.tp or 1
        node, host = group.node, _node_host(cfg, group.node)
        local = node == me
        for k in range(group.count):
            name = f"{group.role}-{k}"
            alloc = ports(host)
            if group.base_port is not None:
                port = alloc.claim(group.base_port + k, f"instances[{g}].base_port", f"{name} HTTP") if local \
                    else group.base_port + k
            elif local:
                port = alloc.free(f"{name} HTTP")
            else:
                raise PdlaunchError(f"{name} runs on node {node}, so its port must be known to node {me}",
                                    field=f"instances[{g}].base_port", hint="set base_port for groups on other nodes")

            if group.devices is not None:
                placed = [PlacedRank(node, d) for d in group.devices[k * tp:(k + 1) * tp]]
            else:
                placed = place_group(cfg, node, tp, used_devices, pools, f"instances[{g}].tp")
                placed += [PlacedRank(node, None)] * (tp - len(placed))  # a full node: reported below on CUDA
            rank_nodes = [p.node for p in placed]
            placement = RankPlacement(nodes=rank_nodes, hosts=[_node_host(cfg, n) for n in rank_nodes])
            if placement.spans_nodes:
                _check_spanning(cfg, g, name, group.role)
            here = [r for r, n in enumerate(rank_nodes) if n == node]  # ranks 0..L-1 on the instance's node

            side_port = None
            side_ports: dict[int, int | None] = {}  # rank -> its side-channel port (remote ranks of this node)
            for rank_node in sorted(set(rank_nodes)):
                ranks = [r for r, n in enumerate(rank_nodes) if n == rank_node]
                offset = side_offsets.get(rank_node, 0)
                side_offsets[rank_node] = offset + len(ranks)
                if group.role == "colocated" or rank_node != me:
                    continue
                rank_alloc = ports(_node_host(cfg, rank_node))
                base = cfg.kv_transfer.side_channel_port
                if base is None:
                    first = rank_alloc.free_range(len(ranks), f"{name} side channel")
                else:  # rank r of this instance uses side_port + r
                    for i, rank in enumerate(ranks):
                        rank_alloc.claim(base + offset + i, "kv_transfer.side_channel_port",
                                         f"{name} side channel rank {rank}")
                    first = base + offset
                for i, rank in enumerate(ranks):
                    side_ports[rank] = first + i
                if rank_node == node:
                    side_port = first

            master_port = None
            if tp > 1:
                index = master_index.get(node, 0)
                master_index[node] = index + 1
                if placement.spans_nodes:  # every node computes it: fixed numbering from parallel.master_port
                    master_port = cfg.parallel.master_port + index if cfg.parallel.master_port is not None else None
                    if local:
                        alloc.claim(master_port, "parallel.master_port", f"{name} rendezvous")
                elif local:
                    master_port = (alloc.free(f"{name} rendezvous") if cfg.parallel.master_port is None else
                                   alloc.claim(cfg.parallel.master_port + index, "parallel.master_port",
                                               f"{name} rendezvous"))

            devices: list[int] = []
            env: dict[str, str] = {**placement.to_env(), **interface_env(host)} \
                if local and placement.spans_nodes else {}
            if device == "cuda":
                devices = [p.device for p in placed[:len(here)] if p.device is not None]
                if len(devices) < len(here) and local:
                    raise PdlaunchError(f"{name} needs {tp} GPU(s) but node {node} has only "
                                        f"{len(pools[node] or [])} for all instances", field=f"instances[{g}].devices",
                                        hint="lower --prefill/--decode or TP, or list devices to share")
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)

            # The instance sees only its CUDA_VISIBLE_DEVICES, renumbered from 0: spec.devices are those indices.
            spec = InstanceSpec(
                role=group.role, index=k, host=host, port=port, tp=tp, devices=list(range(len(devices))),
                device=device,
                engine_id=f"{cfg.kv_transfer.engine_id}-{name}", side_channel_port=side_port,
                master_port=master_port,
            )
            plans.append(InstancePlan(spec=spec, url=f"http://{_url_host(host)}:{port}", local=local, env=env,
                                      physical_devices=devices, node=node))
            for rank, placed_rank in enumerate(placed):
                if placed_rank.node == me and placed_rank.node != node:
                    remote = _remote_rank_plan(spec, rank, placement, placed_rank, side_ports.get(rank))
                    remote.env.update(interface_env(placement.hosts[rank]))
                    remote_ranks.append(remote)
    if not plans:
        raise PdlaunchError("the deployment has no instances", field="instances",
                            hint="pass --prefill 1 --decode 1, or --colocated")
    return DeploymentPlan(instances=plans, proxy_host=cfg.proxy.host, proxy_port=proxy_port,
                          remote_ranks=remote_ranks)
