"""From a validated config to concrete processes: ports, devices, engine_ids (one InstanceSpec each).

Fixed ports follow config/resources.py's port plan (HTTP: base_port + k; side channel: per node,
instance after instance in group order, one port per TP rank); unset ones are picked free here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdlaunch.config.models import DeploymentConfig, InstanceSpec
from pdlaunch.config.rules import LOOPBACK_HOSTS, side_channel_reach_problem
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
class DeploymentPlan:
    instances: list[InstancePlan]
    proxy_host: str
    proxy_port: int | None  # None: this node runs no proxy (node_rank > 0)

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


def _node_devices(cfg: DeploymentConfig, node: int) -> list[int]:
    if cfg.parallel.nodes and cfg.parallel.nodes[node].devices:
        return list(cfg.parallel.nodes[node].devices)
    return list(range(platform.device_count())) if platform.cuda_available() else []




def check_side_channel_reach(cfg: DeploymentConfig) -> None:
    """Raises PdlaunchError when prefill and decode run on different nodes and the KV side channel
    binds a loopback address (decode on the other node could not reach it)."""
    reach = side_channel_reach_problem(cfg)
    if reach is not None:
        field, message = reach
        raise PdlaunchError(message, field=field)


def instance_config(cfg: DeploymentConfig) -> DeploymentConfig:
    """The config this node's instances run with. Multi-node: TP groups never span nodes, so each
    group's rendezvous (hosted by its rank 0) is on its own node's loopback; parallel.master_addr
    names node 0 and would send node K's ranks into node 0's stores (same master_port numbering)."""
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
    next_device: dict[int, int] = {}  # node -> index into that node's free devices
    master_index = 0
    plans: list[InstancePlan] = []
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

            side_port = None
            offset = side_offsets.get(node, 0)
            side_offsets[node] = offset + tp
            if group.role != "colocated" and local:
                base = cfg.kv_transfer.side_channel_port
                if base is None:
                    side_port = alloc.free_range(tp, f"{name} side channel")
                else:  # rank r of this instance uses side_port + r
                    for rank in range(tp):
                        alloc.claim(base + offset + rank, "kv_transfer.side_channel_port",
                                    f"{name} side channel rank {rank}")
                    side_port = base + offset

            master_port = None
            if tp > 1 and local:
                master_port = (alloc.free(f"{name} rendezvous") if cfg.parallel.master_port is None else
                               alloc.claim(cfg.parallel.master_port + master_index, "parallel.master_port",
                                           f"{name} rendezvous"))
                master_index += 1

            devices: list[int] = []
            env: dict[str, str] = {}
            if device == "cuda":
                if group.devices is not None:
                    devices = list(group.devices[k * tp:(k + 1) * tp])
                else:
                    pool = _node_devices(cfg, node)
                    start = next_device.get(node, 0)
                    devices = pool[start:start + tp]
                    next_device[node] = start + tp
                    if len(devices) < tp and local:
                        raise PdlaunchError(f"{name} needs {tp} GPU(s) but node {node} has only "
                                            f"{len(pool)} for all instances", field=f"instances[{g}].devices",
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
    if not plans:
        raise PdlaunchError("the deployment has no instances", field="instances",
                            hint="pass --prefill 1 --decode 1, or --colocated")
    return DeploymentPlan(instances=plans, proxy_host=cfg.proxy.host, proxy_port=proxy_port)
