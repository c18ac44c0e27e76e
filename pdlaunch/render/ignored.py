"""Settings that the manifests leave out, named so that a user who set them does not expect the pods to follow them:
Kubernetes starts the pods and places them (a LeaderWorkerSet per instance group), whatever launcher.backend,
parallel.node_rank or parallel.nodes (and each group's `node`) say; each pod binds and advertises its own address,
whatever proxy.host, kv_transfer.side_channel_host or parallel.master_addr say; each pod gets GPUs of its own,
whatever a group's `devices` say; and it restarts them its own way, whatever a group's `restart`, proxy.restart or
the supervision settings of `pdlaunch serve`'s launcher say (all but stall_restart_seconds, carried as a
livenessProbe: render/liveness.py, and drain_timeout_seconds, the proxy's)."""

from __future__ import annotations

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.launcher_config import SupervisionConfig
from pdlaunch.config.problems import Problem, problem


def ignored_settings(cfg: DeploymentConfig) -> list[Problem]:
    """The settings `cfg` has away from their defaults that `render kubernetes` does not carry into the manifests."""
    found: list[Problem] = []
    if cfg.launcher.backend != "local":
        found.append(problem("launcher.backend", f"{cfg.launcher.backend} has no effect on the manifests: Kubernetes "
                             "starts and places the pods (a LeaderWorkerSet per instance group)",
                             f"leave it out, or run `pdlaunch serve` with it where the {cfg.launcher.backend} "
                             "cluster is"))
    if cfg.parallel.node_rank != 0:
        found.append(problem("parallel.node_rank", "has no effect on the manifests: every pod runs its own instance, "
                             "whatever node it lands on", "leave it out"))
    if cfg.parallel.nodes:
        count = len(cfg.parallel.nodes)
        found.append(problem("parallel.nodes", f"{count} node{'s have' if count != 1 else ' has'} no effect on the "
                             "manifests: Kubernetes places the pods (each instance group's `node` too)",
                             "leave parallel.nodes out of a config you render, or pick nodes with a nodeSelector "
                             "added to the manifests"))
    return found + address_settings(cfg) + device_settings(cfg) + restart_settings(cfg)


def address_settings(cfg: DeploymentConfig) -> list[Problem]:
    """The addresses the config has its processes bind: in the manifests the proxy's pod binds every interface (its
    Service reaches it there), and each instance's pods bind every interface for the KV side channel and advertise
    their pod's address; a TP group's ranks meet at their leader pod (render/kubernetes.py _pod_config). A deployment
    that opens no side channel (`_no_side_channel`) binds kv_transfer.side_channel_host nowhere, pods or not."""
    found: list[Problem] = []
    settings = ((cfg.proxy, "host", "proxy.host", "the proxy's pod binds every interface (0.0.0.0), which its Service "
                 "reaches"),
                (cfg.kv_transfer, "side_channel_host", "kv_transfer.side_channel_host", "each pod binds its KV side "
                 "channel on every interface and advertises its pod's address (status.podIP)"),
                (cfg.parallel, "master_addr", "parallel.master_addr", "a TP group's ranks meet at their leader pod "
                 "(LWS_LEADER_ADDRESS)"))
    for section, key, field, instead in settings:
        value = getattr(section, key)
        if key in section.model_fields_set and value != "0.0.0.0":
            unbound = _no_side_channel(cfg) if key == "side_channel_host" else None
            found.append(problem(field, f"{value} has no effect{unbound or ' on the manifests: ' + instead}",
                                 "leave it out of a config you render"))
    return found


def _no_side_channel(cfg: DeploymentConfig) -> str | None:
    """Why no pod opens a KV side channel, as the rest of a "has no effect" message; None when the prefill and decode
    pods open one (nixl, mooncake)."""
    if cfg.kv_transfer.connector == "storage":
        return (" with the storage connector: it moves KV through files in kv_transfer.storage_path and opens no side "
                "channel, so no pod binds or advertises this address")
    if not any(group.role in ("prefill", "decode") for group in cfg.instances):
        return ": every instance is colocated, so no KV moves between instances and no pod opens a KV side channel"
    return None


def device_settings(cfg: DeploymentConfig) -> list[Problem]:
    """Each group's `devices` (of a group that has instances): Kubernetes gives each pod GPUs of its own, numbered from
    0 in the pod, so a GPU listed by two groups (shared on one host, each with a share of its memory) is two GPUs."""
    found: list[Problem] = []
    utilization = cfg.cache.gpu_memory_utilization
    lowered = "gpu_memory_utilization" in cfg.cache.model_fields_set and utilization < 0.9
    for i, group in enumerate(cfg.instances):
        if group.devices is None or group.count == 0:
            continue
        if cfg.device != "cuda":
            found.append(problem(f"instances[{i}].devices", f"{group.devices} has no effect on the manifests: CPU "
                                 "pods (device cpu) use no GPU", "leave it out of a config you render"))
            continue
        found.append(problem(f"instances[{i}].devices", f"{group.devices} has no effect on the manifests: Kubernetes "
                             "gives each pod GPUs of its own (nvidia.com/gpu), numbered from 0 in the pod",
                             "leave it out of a config you render" + (
                                 f"; cache.gpu_memory_utilization {utilization:g}, if it is a share of a GPU the "
                                 "instances shared on one host, leaves the rest of each pod's GPU unused: raise it"
                                 if lowered else "")))
    return found


def restart_settings(cfg: DeploymentConfig) -> list[Problem]:
    """The launcher's restart settings `cfg` has away from their defaults: Kubernetes restarts the pods its own way
    (a container that exits is restarted by the kubelet, with CrashLoopBackOff's backoff of 10 s doubling to 5 min
    and no limit; LWS recreates the group of a leader that restarts; the proxy's Deployment keeps its pod)."""
    found: list[Problem] = []
    for i, group in enumerate(cfg.instances):
        if not group.restart:
            found.append(problem(f"instances[{i}].restart", "false has no effect on the manifests: LWS recreates a "
                                 "dead instance's pods (its LeaderWorkerSet keeps `count` instances running)",
                                 "leave it out of a config you render; to keep an instance down, scale its "
                                 "LeaderWorkerSet (kubectl scale leaderworkerset NAME --replicas N)"))
    if not cfg.proxy.restart:
        found.append(problem("proxy.restart", "false has no effect on the manifests: the proxy's Deployment restarts "
                             "its pod when it dies", "leave it out of a config you render"))
    default = SupervisionConfig()
    sup = cfg.supervision
    if sup.max_restarts != default.max_restarts:
        found.append(problem("supervision.max_restarts", f"{sup.max_restarts} has no effect on the manifests: the "
                             "kubelet restarts a failing container without limit (CrashLoopBackOff, 10 s doubling "
                             "to 5 min between tries), and the deployment is never stopped for it",
                             "leave it out of a config you render; watch the pods' restart counts (kubectl get "
                             "pods) instead"))
    if sup.role_down_grace_seconds != default.role_down_grace_seconds:
        found.append(problem("supervision.role_down_grace_seconds", f"{sup.role_down_grace_seconds:g} has no effect "
                             "on the manifests: nothing stops the deployment when a role is down; Kubernetes keeps "
                             "restarting its pods",
                             "leave it out of a config you render"))
    if sup.restart_backoff_seconds != default.restart_backoff_seconds:
        found.append(problem("supervision.restart_backoff_seconds", f"{sup.restart_backoff_seconds:g} has no effect "
                             "on the manifests: the kubelet waits 10 s before restarting a failed container, "
                             "doubling to 5 min (CrashLoopBackOff)", "leave it out of a config you render"))
    return found
