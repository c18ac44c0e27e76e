"""`--backend ray`: one instance as the launcher sees it on the cluster (its plan, its current placement
group and actors, its supervision record), and the error that stops the deployment."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pdlaunch.config.addresses import host_port
from pdlaunch.config.deployment_config import InstanceSpec
from pdlaunch.config.ray_cluster import InstancePlacement
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.backends.ray_unreachable import RayletProbe, Unreachable
from pdlaunch.launcher.plan import InstancePlan
from pdlaunch.launcher.restart_policy import ProcessRecord

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle
    from ray.util.placement_group import PlacementGroup

State = Literal["placing", "starting", "ready", "down"]


class RayDeploymentFailed(PdlaunchError):
    """The deployment cannot keep serving on the cluster (restarts keep failing, a placement timed out);
    `log_path`: the log of the instance (or the proxy) that failed, whose last lines the launcher shows."""

    def __init__(self, message: str, field: str | None = None, hint: str | None = None,
                 log_path: Path | None = None) -> None:
        self.log_path = log_path
        super().__init__(message, field=field, hint=hint)


@dataclass
class RayRun:
    """One instance on the cluster: its plan, its current placement group and actors, its supervision."""

    plan: InstancePlan
    group: int
    record: ProcessRecord
    placement: InstancePlacement
    log_path: Path
    state: State = "down"
    pg: PlacementGroup | None = None
    pg_ready: ObjectRef[bool] | None = None
    placed_by: float = 0.0  # monotonic deadline of the current placement
    actors: list[ActorHandle] = field(default_factory=list)  # rank 0 first
    serve_ref: ObjectRef[int] | None = None  # its `serve` call, or the `served` call watching it once that was lost
    unreachable: Unreachable | None = None  # while Ray reports its rank-0 actor temporarily unavailable
    spec: InstanceSpec | None = None  # as running now: its node's address, its engine_id
    raylet: RayletProbe | None = None  # rank 0's node's raylet (node manager address:port as Ray listed it at launch)
    started: float = 0.0

    @property
    def name(self) -> str:
        return self.plan.spec.name

    @property
    def url(self) -> str | None:
        """Where the instance answers: its node's address as Ray reports it, bracketed when IPv6 (`fd00::2`)."""
        if self.spec is None:
            return None
        return f"http://{host_port(self.spec.host, self.spec.port)}"
