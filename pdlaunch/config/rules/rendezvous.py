"""parallel.rendezvous_timeout_seconds against the launcher's readiness deadline: a warning (check-config, serve).

Under `pdlaunch serve` (every backend: local, slurm, ray) each node's launcher gives an instance LAUNCHER_READY_S
from its start to be ready, then stops the start (a restarted instance: kills it), whatever its TP group's rendezvous
still allows. A rendezvous allowed that long never runs out: a rank that comes later fails the start as `not ready
after 900s` (or `instances on other nodes not ready ...`), which names neither the late rank nor this setting, and
rank 0 loads its weights only after the rendezvous, inside the same deadline. The manifests of `render kubernetes`
have no such deadline (a pod is only marked not ready), so there the setting may be larger; render does not run this.
"""

from __future__ import annotations

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.problems import Problem, problem

# how long each node's launcher gives an instance to be ready (launcher/readiness.READY_TIMEOUT_S is this value:
# the config sits below the launcher, so the launcher takes it from here)
LAUNCHER_READY_S = 900.0
FIELD = "parallel.rendezvous_timeout_seconds"


def rendezvous_timeout_warnings(cfg: DeploymentConfig) -> list[Problem]:
    """The resolved `cfg`'s rendezvous setting when some instance has TP > 1 (a group that rendezvouses) and the
    setting is not below the launcher's readiness deadline, which then stops the instance first."""
    value = cfg.parallel.rendezvous_timeout_seconds
    if value < LAUNCHER_READY_S:
        return []
    if not any((group.tp if group.tp is not None else cfg.parallel.tp) > 1 for group in cfg.instances):
        return []
    return [problem(FIELD, f"{value:g}s is not below the {LAUNCHER_READY_S:g}s the launcher gives an instance to be "
                    f"ready (from its start, weights loaded): a TP rank that comes later than that fails the start "
                    f"as `not ready after {LAUNCHER_READY_S:g}s` before the rendezvous gives up naming it",
                    f"start every node's launcher (or let Ray place every rank) well within {LAUNCHER_READY_S:g}s "
                    f"of the others and keep {FIELD} below that; only the `render kubernetes` manifests, which "
                    "have no readiness deadline, use a larger value")]
