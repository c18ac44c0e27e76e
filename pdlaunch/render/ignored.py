"""Settings of where the deployment's processes run that the manifests leave out, named so that a user who set them
does not expect the pods to follow them: Kubernetes starts the pods and places them (a LeaderWorkerSet per instance
group), whatever launcher.backend, parallel.node_rank or parallel.nodes (and each group's `node`) say."""

from __future__ import annotations

from pdlaunch.config.deployment_config import DeploymentConfig
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
    return found
