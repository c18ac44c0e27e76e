"""Which GPUs a deployment's ranks go on, checked against what this node sees: the pool of CUDA indices the plan
places ranks on (launcher/plan.py), a node's own GPU count against the plan, and the error of an instance given
fewer GPUs than its ranks."""

from __future__ import annotations

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.placement import listed_devices, unplaced_error
from pdlaunch.config.port_plan import PlannedInstance
from pdlaunch.errors import PdlaunchError
from pdlaunch.memory import host_devices


def node_host(cfg: DeploymentConfig, node: int) -> str:
    """The address of node `node` (loopback for a deployment of one node)."""
    return cfg.parallel.nodes[node].address if cfg.parallel.nodes else "127.0.0.1"


def cuda_pool(cfg: DeploymentConfig, device: str) -> list[int]:
    """The CUDA indices ranks are placed on ([] on CPU): the devices this launcher sees. Under --backend ray each
    rank's actor runs on the one GPU Ray gives it (Ray sets its CUDA_VISIBLE_DEVICES, also on a cluster that turned
    that off: ray_actors.rank_actor_options; the rank uses its device 0): this machine's GPUs place none, so each
    rank gets a slot (config/ray_cluster.py checks the cluster's GPUs)."""
    if device != "cuda":
        return []
    if cfg.launcher.backend == "ray":
        return list(range(sum(group.count * (group.tp or 1) for group in cfg.instances)))
    return list(range(host_devices.device_count())) if host_devices.cuda_available() else []


def check_node_gpus(cfg: DeploymentConfig, planned: list[PlannedInstance], gpus: int) -> None:
    """This node has every GPU the plan puts its ranks on (`gpus`: the CUDA devices it sees). The plan is
    the same on every node and never asks this machine (config/placement.py), so each node checks its own
    count here. Raises PdlaunchError naming the field that placed ranks on a GPU this node lacks."""
    me = cfg.parallel.node_rank
    indices = {0: "", 1: ", CUDA device 0"}.get(gpus, f", CUDA devices 0-{gpus - 1}")
    sees = f"node {me} ({node_host(cfg, me)}) sees {gpus} GPU(s){indices}"
    over = [(instance, rank.device) for instance in planned for rank in instance.ranks
            if rank.node == me and rank.device is not None and rank.device >= gpus]
    if not over:
        return
    instance, device = over[0]
    group = f"instances[{instance.group}]"
    if cfg.instances[instance.group].devices is not None and instance.node == me:
        raise PdlaunchError(f"{instance.name} runs on GPU {device} ({group}.devices), but {sees}",
                            field=f"{group}.devices", hint="list only this node's GPUs")
    if cfg.parallel.nodes[me].devices:
        raise PdlaunchError(f"parallel.nodes[{me}].devices lists GPU {device} ({instance.name} runs a rank there), "
                            f"but {sees}", field=f"parallel.nodes[{me}].devices", hint="list only this node's GPUs")
    if instance.node == me and cfg.instances[instance.group].devices is None and listed_devices(cfg, me):
        raise unplaced_error(cfg, instance.group, range(gpus), sees)  # it skipped GPUs other groups list
    names = ", ".join(dict.fromkeys(i.name for i, _ in over))
    raise PdlaunchError(f"{sees}, but the plan puts {1 + max(d for _, d in over)} ranks on it, one GPU each ({names} "
                        f"on GPU {gpus} and up): a node that lists no devices holds every rank placed on it, so "
                        "that every node's launcher plans the same", field=f"parallel.nodes[{me}].devices",
                        hint=f"list node {me}'s GPUs (devices: {list(range(gpus))}) so that a TP group larger than "
                        "that spans the nodes after it, or place fewer ranks on this node")


def short_of_gpus(cfg: DeploymentConfig, g: int, name: str, ranks: int, num_cuda: int) -> PdlaunchError:
    """Instance `name` of group g, on its node, got fewer GPUs than its ranks. A group that lists no devices takes
    the ones no group lists there (config/placement.py), so the error names those taken."""
    node, nodes = cfg.instances[g].node, cfg.parallel.nodes
    if cfg.instances[g].devices is None:
        if nodes and nodes[node].devices:
            return unplaced_error(cfg, g, nodes[node].devices, f"parallel.nodes[{node}].devices lists "
                                  f"{nodes[node].devices}")
        return unplaced_error(cfg, g, range(num_cuda), f"this machine has {num_cuda} GPU(s)")
    return PdlaunchError(f"{name} needs {ranks} GPU(s) but instances[{g}].devices lists fewer",
                         field=f"instances[{g}].devices", hint="list count*tp device indices")
