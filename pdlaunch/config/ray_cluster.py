"""What `--backend ray` needs from the Ray cluster, checked before anything starts (check-config and serve).

- ray importable (the `pdlaunch[ray]` extra);
- the cluster answering at `launcher.ray_address` (a GCS HOST:PORT is probed with a bounded TCP connect
  first: ray.init itself waits minutes on an address nothing listens at);
- every custom resource named in `launcher.ray_resources` on at least one live node, and some node
  (or, for a group that spreads, the cluster) able to hold one instance's bundles (every instance's bundles
  together: config/ray_fit.py; both in order: config/ray_check.py);
- no field of the local launcher (parallel.nodes, node_rank, a group's node): Ray places the ranks.

The placement plan of an instance (its bundles, PACK or SPREAD) is decided here too, from the live
nodes' total resources, so that check-config and the launcher agree.

The instances run on the cluster's nodes, not on the machine the launcher runs on (often a head without
GPUs): `device: auto` means cuda when a live node has a GPU, and a CUDA deployment is checked against the
cluster's GPUs (per node, and one GPU's memory read by a one-GPU Ray task), not this machine's.
"""

from __future__ import annotations

import importlib
import logging
import re
import socket
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

from pdlaunch.config.addresses import host_syntax_error
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.ray_gcs import FIELD, check_gcs_answers
from pdlaunch.config.ray_init import cluster_words, init_in_thread
from pdlaunch.config.ray_thread import in_ray_thread
from pdlaunch.config.strict_model import Role
from pdlaunch.errors import PdlaunchError
from pdlaunch.memory import host_devices

INSTALL_HINT = "pip install 'pdlaunch[ray]' (the ray package), on this machine and on every node of the cluster"
CONNECT_TIMEOUT_S = 5.0  # the GCS port must accept a TCP connection within this
GPU_PROBE_TIMEOUT_S = 120.0  # a one-GPU task reading the GPU's memory (a node's Python imports torch first)
NODES_TIMEOUT_S = 60.0  # ray.nodes: one GCS request, answered within milliseconds by a live head
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # e.g. RayTaskError's "\x1b[36mray::gpu_total_bytes()\x1b[39m"
NAMESPACE = "pdlaunch"  # Ray namespace of every actor the launcher makes

Strategy = Literal["PACK", "SPREAD"]


@dataclass(frozen=True)
class RayNode:
    """A live node as Ray reports it."""

    node_id: str
    address: str  # the node IP Ray reports (NodeManagerAddress)
    resources: dict[str, float]  # total resources of the node


@dataclass(frozen=True)
class InstancePlacement:
    """One instance's placement group: one bundle per TP rank."""

    bundles: list[dict[str, float]]
    strategy: Strategy
    role: Role

    def describe(self) -> str:
        """The resources asked for, as an error message names them."""
        return f"{len(self.bundles)} bundle(s) of {fmt_resources(self.bundles[0])} ({self.strategy})"


@dataclass
class ClusterCheck:
    """What the cluster lacks for the config: field -> message."""

    problems: list[tuple[str, str]] = field(default_factory=list)


def fmt_resources(resources: dict[str, float]) -> str:
    """`{CPU: 2, pd_decode: 0.01}`: resources as messages name them."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def import_ray() -> ModuleType:
    """The ray module, or PdlaunchError naming the extra to install."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise PdlaunchError("--backend ray needs the ray package, which is not installed here",
                            field="launcher.backend", hint=INSTALL_HINT) from None


def bundle(cfg: DeploymentConfig, role: Role) -> dict[str, float]:
    """One TP rank's bundle: one GPU on CUDA (one CPU otherwise), plus the role's custom resources."""
    device = cfg.device if cfg.device != "auto" else host_devices.resolve_device("auto")
    own = {"GPU": 1.0} if device == "cuda" else {"CPU": 1.0}
    return {**own, **cfg.launcher.ray_resources.for_role(role)}


def plan_instance(cfg: DeploymentConfig, role: Role, tp: int, nodes: list[RayNode]) -> InstancePlacement:
    """PACK when one live node can hold every bundle of the instance, SPREAD otherwise."""
    one = bundle(cfg, role)
    needed = {name: amount * tp for name, amount in one.items()}
    fits_one = any(all(node.resources.get(name, 0.0) >= amount for name, amount in needed.items()) for node in nodes)
    return InstancePlacement([dict(one) for _ in range(tp)], "PACK" if fits_one else "SPREAD", role)


def bundle_slots(one: dict[str, float], nodes: list[RayNode]) -> int:
    """How many bundles `one` the idle `nodes` hold in all (a bundle is never split across nodes)."""
    return sum(min(int(n.resources.get(k, 0.0) / v + 1e-9) for k, v in one.items()) for n in nodes)


def unplaceable(placement: InstancePlacement, nodes: list[RayNode]) -> str | None:
    """Why the live nodes can never hold `placement` (None when they can, resources permitting)."""
    one = placement.bundles[0]
    hosts = [n for n in nodes if all(n.resources.get(k, 0.0) >= v for k, v in one.items())]
    if not hosts:
        return f"no live node can hold one bundle {fmt_resources(one)}"
    slots = bundle_slots(one, hosts)
    if slots < len(placement.bundles):
        return (f"the live nodes hold {slots} bundle(s) of {fmt_resources(one)} in all, and a {placement.role} "
                f"instance needs {len(placement.bundles)} (its TP size)")
    return None


def check_cluster(cfg: DeploymentConfig, nodes: list[RayNode]) -> list[tuple[str, str]]:
    """Problems of `cfg` on the cluster of `nodes`: unknown resources, instances that cannot be placed."""
    from pdlaunch.config.validate import group_tp

    problems: list[tuple[str, str]] = []
    known = {name for node in nodes for name in node.resources}
    for role in ("prefill", "decode", "colocated"):
        missing = sorted(set(cfg.launcher.ray_resources.for_role(role)) - known)
        if missing:
            problems.append((f"launcher.ray_resources.{role}",
                             f"no live node of the Ray cluster has the resource(s) {', '.join(missing)} (nodes: "
                             + "; ".join(f"{n.address} {fmt_resources(n.resources)}" for n in nodes) + ")"))
    if problems:
        return problems
    for i, group in enumerate(cfg.instances):
        if group.count == 0:
            continue
        why = unplaceable(plan_instance(cfg, group.role, group_tp(cfg, group), nodes), nodes)
        if why is not None:
            problems.append((f"instances[{i}]", why))
    return problems


def check_local_fields(cfg: DeploymentConfig) -> None:
    """Fields that place processes by hand mean nothing under Ray: refuse them rather than ignore them."""
    if cfg.parallel.nodes:
        raise PdlaunchError("--backend ray places every TP rank itself: parallel.nodes is not used",
                            field="parallel.nodes", hint="remove parallel.nodes; pin roles to nodes with "
                            "launcher.ray_resources and `ray start --resources`")
    if cfg.parallel.node_rank:
        raise PdlaunchError("--backend ray runs one launcher for the whole cluster: --node-rank is not used",
                            field="parallel.node_rank", hint="drop --node-rank")
    for i, group in enumerate(cfg.instances):
        if group.node:
            raise PdlaunchError("--backend ray places instances itself: a group's node is not used",
                                field=f"instances[{i}].node", hint="pin the role with launcher.ray_resources")


def check_address(address: str) -> tuple[str, int]:
    """The HOST and PORT of a GCS address `HOST:PORT`, or PdlaunchError saying what is wrong with it."""
    host, sep, port = address.rpartition(":")
    if address.startswith("ray://"):
        raise PdlaunchError(f"{address} is a Ray Client address; the launcher connects to the GCS directly",
                            field=FIELD, hint="give the head's GCS HOST:PORT (`ray start --head` prints it)")
    if not sep or not (port.isascii() and port.isdigit()) or not host:
        raise PdlaunchError(f"{address!r} is not HOST:PORT or auto", field=FIELD,
                            hint="e.g. --ray-address 10.0.0.5:6379 (the head's GCS port)")
    reason = "a scheme" if "://" in host else host_syntax_error(host.removeprefix("[").removesuffix("]"))
    if reason is not None:
        raise PdlaunchError(f"{address!r} is not HOST:PORT or auto: {reason}", field=FIELD,
                            hint="write the head's IP address or host name and its GCS port, e.g. "
                            "--ray-address 10.0.0.5:6379, no scheme")
    if not 1 <= int(port) <= 65535:
        raise PdlaunchError(f"{address!r}: port {port} is outside 1..65535", field=FIELD,
                            hint="give the head's GCS port, 6379 unless `ray start --head --port` changed it")
    return host.removeprefix("[").removesuffix("]"), int(port)


def gcs_probe(address: str) -> None:
    """Raise PdlaunchError unless something accepts a TCP connection at HOST:PORT within CONNECT_TIMEOUT_S."""
    host, port = check_address(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise PdlaunchError(f"no Ray cluster answers at {address} (TCP connect within {CONNECT_TIMEOUT_S:.0f}s: "
                            f"{exc})", field=FIELD, hint="start it with `ray start --head` there, or check the "
                            "address and that this machine reaches it") from None


def connect(cfg: DeploymentConfig) -> ModuleType:
    """ray, connected to the cluster of `cfg` (once per process). Raises PdlaunchError."""
    address = cfg.launcher.ray_address
    if address != "auto":
        check_address(address)  # a malformed address is named even where ray is not installed
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address != "auto":
        gcs_probe(address)  # refused or unreachable: named at once
        check_gcs_answers(address, *check_address(address))  # accepted but silent: ray.init would retry for minutes
    logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        # in a helper thread: a stop signal's exception raised inside ray.init can hang the process (ray_init.py)
        init_in_thread(ray, address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING,
                       configure_logging=False)
    except PdlaunchError:
        raise  # ray.init not returning within its bound (ray_init.py) is named already
    except Exception as exc:  # noqa: BLE001 (ConnectionError, RuntimeError for a version mismatch, ValueError, ...)
        raise PdlaunchError(f"cannot connect to {cluster_words(address)}: {exc}{_cause_of(exc)}", field=FIELD,
                            hint="start one with `ray start --head`, or give its address with --ray-address "
                            "HOST:PORT") from None
    return ray


def _first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message, without the terminal colours Ray puts in a task's name."""
    lines = ANSI_ESCAPE.sub("", str(exc)).splitlines()
    return lines[0] if lines else ""


def _cause_of(exc: BaseException) -> str:
    """The error Ray's headline wraps (e.g. a login token the cluster refuses), as ` (Type: last line)`."""
    cause = exc.__cause__ or exc.__context__
    if cause is None:
        return ""
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f" ({type(cause).__name__}: {lines[-1]})" if lines else f" ({type(cause).__name__})"


def live_nodes(ray: ModuleType) -> list[RayNode]:
    """The cluster's live nodes, with their total resources (ray.nodes in a helper thread: config/ray_thread.py)."""
    late = PdlaunchError(f"the Ray cluster did not list its nodes within {NODES_TIMEOUT_S:.0f}s", field=FIELD,
                         hint="the head may be overloaded or stuck: check it with `ray status` there")
    found = in_ray_thread(ray, ray.nodes, "listing the Ray cluster's nodes", NODES_TIMEOUT_S, late)
    return [RayNode(str(n["NodeID"]), str(n["NodeManagerAddress"]),
                    {str(k): float(v) for k, v in dict(n.get("Resources") or {}).items()})
            for n in found if n.get("Alive")]


def cluster_has_gpus(nodes: list[RayNode]) -> bool:
    return any(node.resources.get("GPU", 0.0) >= 1 for node in nodes)


def with_cluster_device(cfg: DeploymentConfig, nodes: list[RayNode]) -> DeploymentConfig:
    """`device: auto` made the cluster's: cuda when a live node has a GPU, else cpu. Resolved on this machine
    instead, a launcher on a head without GPUs would ask for CPU bundles and run a GPU cluster's instances on
    CPUs without a word."""
    if cfg.device != "auto":
        return cfg
    device = "cuda" if cluster_has_gpus(nodes) else "cpu"
    logging.getLogger(__name__).info("device auto: %s (the Ray cluster's live nodes %s GPUs)", device,
                                     "have" if device == "cuda" else "have no")
    return cfg.model_copy(update={"device": device})


def gpu_total_bytes() -> int:
    """The memory of the GPU a Ray task was given (runs on a cluster node)."""
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory)


def cluster_gpus(cfg: DeploymentConfig) -> tuple[int, float] | None:
    """For a CUDA deployment: the most GPUs a live node has and one GPU's memory in GiB (a one-GPU Ray task
    reads it; the cluster's GPUs are taken to be alike), which the config is checked against instead of this
    machine's. None for a CPU deployment or a cluster without GPUs (check_cluster names what is missing)."""
    if cfg.device != "cuda":
        return None
    ray = connect(cfg)
    per_node = max((int(node.resources.get("GPU", 0.0)) for node in live_nodes(ray)), default=0)
    if per_node == 0:
        return None
    # in a helper thread (config/ray_thread.py): a stop signal's exception raised inside ray.get came out of Ray as
    # a SystemError, reported as a GPU that could not be read; the main thread's bound is a backstop to ray.get's
    late = PdlaunchError(f"the Ray cluster did not run a one-GPU task within {GPU_PROBE_TIMEOUT_S:.0f}s",
                         field=FIELD, hint="every GPU may be held by other tasks (`ray status`)")
    try:
        total = in_ray_thread(ray, lambda: ray.get(ray.remote(num_gpus=1)(gpu_total_bytes).remote(),
                                                   timeout=GPU_PROBE_TIMEOUT_S),
                              "reading a GPU's memory on the Ray cluster", GPU_PROBE_TIMEOUT_S + NODES_TIMEOUT_S, late)
    except PdlaunchError:
        raise
    except Exception as exc:  # noqa: BLE001 (Ray's task, timeout and node errors have no common base but this)
        raise PdlaunchError(f"could not read the memory of a GPU of the Ray cluster within {GPU_PROBE_TIMEOUT_S:.0f}s "
                            f"(a one-GPU task): {type(exc).__name__}: {_first_line(exc)}",
                            field=FIELD, hint="every GPU may be held by other tasks (`ray status`), or a node's "
                            "CUDA or torch is broken; free a GPU, or check the nodes") from None
    return per_node, int(total) / (1 << 30)

