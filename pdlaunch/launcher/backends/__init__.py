"""Launcher backends: who starts each node's processes (`launcher.backend`, `--backend`).

local (launcher/serve.py): this machine's launcher starts its own processes (on several nodes, one
`pdlaunch serve --node-rank K` per node); slurm (slurm.py): one srun step per node of the allocation;
ray (ray.py): one placement group per instance and one actor per TP rank on a Ray cluster.
"""

from __future__ import annotations

from pdlaunch.config.deployment_config import DeploymentConfig


def run_deployment(cfg: DeploymentConfig) -> int:
    """`pdlaunch serve` with the config's backend; the exit code."""
    if cfg.launcher.backend == "ray":
        from pdlaunch.launcher.backends.ray import run_ray

        return run_ray(cfg)
    if cfg.launcher.backend == "slurm":
        from pdlaunch.launcher.backends.slurm import run_slurm

        return run_slurm(cfg)
    from pdlaunch.launcher.serve import run_serve

    return run_serve(cfg)
