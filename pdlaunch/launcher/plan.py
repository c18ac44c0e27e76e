"""From a validated config to concrete processes: ports, devices, engine_ids (one InstanceSpec each).

Ranks and fixed ports follow the port plan (config/port_plan.py), the same one check-config reports;
unset ports are picked free here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdlaunch.config.addresses import url_host
from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.engine_ids import planned_engine_id
from pdlaunch.config.placement import PlacedRank
from pdlaunch.config.port_plan import PlannedInstance, plan_instances
from pdlaunch.config.port_reservations import PortReservations
from pdlaunch.config.rules.roles import LOOPBACK_HOSTS, side_channel_reach_problem, spanning_side_channel_unreachable
from pdlaunch.config.topology_config import group_expert_parallel, group_kv_cache_dtype
from pdlaunch.distributed.placement import RankPlacement, interface_env
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.gpu_plan import check_node_gpus, cuda_pool, node_host, short_of_gpus
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.memory import host_devices

# The proxy's port is fixed even where nothing sets it (8000), so a second deployment started with only its own
# --log-dir meets the first one there: the fix names the flag, which the user may never have typed.
PROXY_PORT_FIX = "pass another --port (the proxy's port, 8000 by default)"


@dataclass
class InstancePlan:
    spec: InstanceSpec
    url: str
    local: bool  # runs on this node (else another node's launcher starts it)
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the process
    physical_devices: list[int] = field(default_factory=list)  # CUDA indices as its node's launcher counts them
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
    return url_host(host)


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
    if spanning_side_channel_unreachable(cfg, role):
        raise PdlaunchError(f"{name}'s TP group spans nodes but the KV side channel binds "
                            f"{cfg.kv_transfer.side_channel_host}: its ranks on other nodes could not be reached",
                            field="kv_transfer.side_channel_host",
                            hint="set it to 0.0.0.0: each rank then advertises its own node's address")


def _remote_rank_plan(spec: InstanceSpec, rank: int, placement: RankPlacement, placed: PlacedRank,
                      side_port: int | None) -> RemoteRankPlan:
    """Rank `rank` of `spec` as the node hosting it runs it: it advertises that node's address, its
    connector binds spec.side_channel_port + rank (so that is its planned port), and on CUDA it sees
    one device (CUDA_VISIBLE_DEVICES), index 0: the entry of this launcher's own list (a SLURM step's GPUs)
    for placed.device, which counts the devices this launcher sees, as for this node's instances."""
    env: dict[str, str] = {}
    devices: list[int] = []
    if placed.device is not None and spec.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = host_devices.child_visible_devices([placed.device])
        devices = [0] * spec.tp
    rank_spec = spec.model_copy(update={
        "host": placement.hosts[rank], "devices": devices,
        "side_channel_port": None if side_port is None else side_port - rank,
    })
    return RemoteRankPlan(instance=spec.name, rank=rank, spec=rank_spec, placement=placement, env=env,
                          physical_device=placed.device)


def instance_config(cfg: DeploymentConfig) -> DeploymentConfig:
    """The config this node's instances run with. Multi-node: each group's rendezvous store is hosted
    by its rank 0 on its own node (on loopback for a group on one node, where its ranks reach it), while
    parallel.master_addr names node 0 and would send node K's ranks into node 0's stores (same master_port
    numbering). A spanning group's store listens on the rank-0 node's address, which ranks on other nodes dial
    (distributed/parallel_state.py)."""
    if not cfg.parallel.nodes or cfg.parallel.master_addr in LOOPBACK_HOSTS:
        return cfg
    parallel = cfg.parallel.model_copy(update={"master_addr": "127.0.0.1"})
    return cfg.model_copy(update={"parallel": parallel})


def plan_deployment(cfg: DeploymentConfig, reservations: PortReservations | None = None) -> DeploymentPlan:
    """Assign every instance its ports, devices and engine_id. Raises PdlaunchError naming the field.

    Ranks and fixed ports come from config/port_plan.py (what check-config reports); this node's
    launcher claims the ports of its own processes and picks the unset ones free. A run passes
    `reservations`: every port claimed is held there against other launchers on this host until the run
    releases it (config/port_reservations.py)."""
    device = host_devices.resolve_device(cfg.device)
    if device not in ("cpu", "cuda"):
        raise PdlaunchError(f"unknown device {device!r}", field="device", hint="use auto, cpu or cuda")
    me = cfg.parallel.node_rank
    ports = _Allocators(reservations)
    proxy_port: int | None = None
    if me == 0:
        proxy_alloc = ports.on(cfg.proxy.host)
        proxy_port = (proxy_alloc.free("proxy") if cfg.proxy.port == 0
                      else proxy_alloc.claim(cfg.proxy.port, "proxy.port", "proxy", fix=PROXY_PORT_FIX))
    gpus = cuda_pool(cfg, device)
    plans: list[InstancePlan] = []
    remote_ranks: list[RemoteRankPlan] = []
    every = plan_instances(cfg, gpus)
    if device == "cuda" and cfg.parallel.nodes:
        check_node_gpus(cfg, every, len(gpus))
    for planned in every:
        plan, remotes = _plan_instance(cfg, planned, device, ports, len(gpus))
        plans.append(plan)
        remote_ranks += remotes
    if not plans:
        raise PdlaunchError("the deployment has no instances", field="instances",
                            hint="pass --prefill 1 --decode 1, or --colocated")
    return DeploymentPlan(instances=plans, proxy_host=cfg.proxy.host, proxy_port=proxy_port,
                          remote_ranks=remote_ranks)


class _Allocators:
    """One PortAllocator per host this node binds on, handing out each port number once across them all, as
    check-config counts collisions per node: the proxy's, the instances' and the side channel's hosts may overlap
    (0.0.0.0 takes a port on every address)."""

    def __init__(self, reservations: PortReservations | None) -> None:
        self._by_host: dict[str, PortAllocator] = {}
        self._reservations = reservations
        self._taken: set[int] = set()

    def on(self, host: str) -> PortAllocator:
        if host not in self._by_host:
            self._by_host[host] = PortAllocator(host, self._reservations, self._taken)
        return self._by_host[host]


def _plan_instance(cfg: DeploymentConfig, planned: PlannedInstance, device: str, ports: _Allocators,
                   num_cuda: int) -> tuple[InstancePlan, list[RemoteRankPlan]]:
    """One instance as this node sees it, and the ranks of it this node runs when rank 0 is elsewhere."""
    me, g, name, node = cfg.parallel.node_rank, planned.group, planned.name, planned.node
    host, local = node_host(cfg, node), node == me
    placement = RankPlacement(nodes=planned.rank_nodes, hosts=[node_host(cfg, n) for n in planned.rank_nodes])
    if planned.spans_nodes:
        _check_spanning(cfg, g, name, planned.role)
    port = _http_port(planned, ports.on(host), local, me)
    side_port, side_ports = _side_channel_ports(cfg, planned, ports)
    master_port = planned.rendezvous_port
    if planned.rendezvous_index is not None and local:
        master_port = (ports.on(host).free(f"{name} rendezvous") if master_port is None else
                       ports.on(host).claim(master_port, "parallel.master_port", f"{name} rendezvous"))

    here = [r for r, n in enumerate(planned.rank_nodes) if n == node]  # ranks 0..L-1 on the instance's node
    devices: list[int] = []
    env: dict[str, str] = {**placement.to_env(), **interface_env(host)} if local and planned.spans_nodes else {}
    if device == "cuda":
        devices = [p.device for p in planned.ranks[:len(here)] if p.device is not None]
        if len(devices) < len(here) and local:
            raise short_of_gpus(cfg, g, name, len(planned.ranks), num_cuda)
        # this launcher's own CUDA_VISIBLE_DEVICES renumbers the devices it counted: the child gets their names
        # (another node's instance gets its node's launcher's; a Ray actor, Ray's)
        if local and cfg.launcher.backend != "ray":
            env["CUDA_VISIBLE_DEVICES"] = host_devices.child_visible_devices(devices)

    # The instance sees only its CUDA_VISIBLE_DEVICES, renumbered from 0: spec.devices are those indices.
    spec = InstanceSpec(
        role=planned.role, index=planned.number, host=host, port=port, tp=len(planned.ranks),
        expert_parallel=group_expert_parallel(cfg.parallel, cfg.instances[g]),
        kv_cache_dtype=group_kv_cache_dtype(cfg.cache, cfg.instances[g]),
        devices=list(range(len(devices))), device=device,
        engine_id=planned_engine_id(name, cfg.kv_transfer.engine_id), side_channel_port=side_port,
        master_port=master_port,
    )
    remotes: list[RemoteRankPlan] = []
    for rank, placed_rank in enumerate(planned.ranks):
        if placed_rank.node == me and placed_rank.node != node:
            remote = _remote_rank_plan(spec, rank, placement, placed_rank, side_ports.get(rank))
            remote.env.update(interface_env(placement.hosts[rank]))
            remotes.append(remote)
    plan = InstancePlan(spec=spec, url=f"http://{_url_host(host)}:{port}", local=local, env=env,
                        physical_devices=devices, node=node)
    return plan, remotes


def _http_port(planned: PlannedInstance, alloc: PortAllocator, local: bool, me: int) -> int:
    field, what = f"instances[{planned.group}].base_port", f"{planned.name} HTTP"
    if planned.http_port is not None:
        return alloc.claim(planned.http_port, field, what) if local else planned.http_port
    if local:
        return alloc.free(what)
    raise PdlaunchError(f"{planned.name} runs on node {planned.node}, so its port must be known to node {me}",
                        field=field, hint="set base_port for groups on other nodes")


def _side_channel_ports(cfg: DeploymentConfig, planned: PlannedInstance,
                        ports: _Allocators) -> tuple[int | None, dict[int, int]]:
    """Claims this node's side-channel ports of the instance on kv_transfer.side_channel_host, the address its
    ranks bind them on: (the port of its rank 0, when rank 0 runs here; rank r binds it + r), and rank -> port for
    every rank on this node."""
    side_port: int | None = None
    side_ports: dict[int, int] = {}
    for ranks in planned.side_channels:
        if ranks.node != cfg.parallel.node_rank:
            continue
        alloc = ports.on(cfg.kv_transfer.side_channel_host)  # where it binds them: kv_transfer/prefill/side.py
        if ranks.first is None:
            first = alloc.free_range(len(ranks.ranks), f"{planned.name} side channel")
        else:
            first = ranks.first
            for i, rank in enumerate(ranks.ranks):
                alloc.claim(first + i, "kv_transfer.side_channel_port", f"{planned.name} side channel rank {rank}")
        side_ports.update({rank: first + i for i, rank in enumerate(ranks.ranks)})
        if ranks.node == planned.node:
            side_port = first
    return side_port, side_ports
