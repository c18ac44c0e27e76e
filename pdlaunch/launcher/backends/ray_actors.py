"""`--backend ray`: each instance's placement group and actors on the cluster, from the placement Ray is
asked for to the actors killed and the group removed.

Once Ray has placed an instance's group, rank 0 is a `RayInstance` actor in bundle 0 (ray_instance.py)
and ranks 1..T-1 are `RayRank` actors in the other bundles (distributed/ray_rank.py); each binds and
advertises the address of the node Ray placed its bundle on. Rank 0's `serve` call runs until the
instance ends; how it ended (the engine failed, an actor died, its node is gone) is read from it. Ray failing it
because the actor is temporarily unavailable is not an end yet (ray_unreachable.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.ray_cluster import NAMESPACE
from pdlaunch.distributed.ray_rank import CONTROL_GROUP, ray_failure
from pdlaunch.errors import exit_text
from pdlaunch.kv_transfer.push_params import PREFILL_SIDE_CHANNELS_ENV
from pdlaunch.launcher.backends.ray_killed import outside_kill
from pdlaunch.launcher.backends.ray_run import RayDeploymentFailed, RayRun
from pdlaunch.launcher.backends.ray_unplaced import unplaced_message
from pdlaunch.launcher.backends.ray_unreachable import RayletProbe, Unreachable, unavailable_why
from pdlaunch.launcher.deployment import INSTANCE_TERM_TIMEOUT_S
from pdlaunch.launcher.process import HURRY_POLL_S

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.util.placement_group import PlacementGroup

STOP_TIMEOUT_S = 30.0  # instances drain and stop their ranks within this before their actors are killed
# a call to a dead rank actor fails at once; a live one, which rank 0 shut down as it exited, answers at once
RANK_PROBE_TIMEOUT_S = 2.0
CONTROL = CONTROL_GROUP  # the concurrency group of RayInstance.stop and RayRank.until_shutdown
# RayInstance.served's: each waits until `serve` ends; one left waiting by a connection that broke again keeps its
# place, and a call past those waits for serve to end before it runs, which returns at once then
WATCH = "watch"
# Set to 1 (a raylet's environment, a job's runtime_env), Ray leaves an actor's CUDA_VISIBLE_DEVICES as its worker
# inherited it (ray._private.accelerators.nvidia_gpu).
NOSET_CUDA_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def rank_actor_options(name: str, pg: PlacementGroup, rank: int, bundle: dict[str, float]) -> dict[str, object]:
    """Ray options of TP rank `rank`'s actor, in bundle `rank` of `pg` (`bundle`: what each bundle holds).

    On CUDA every rank runs on device 0 of what it sees (the launcher gives it devices [0]), which is the GPU of its
    bundle because Ray sets the actor's CUDA_VISIBLE_DEVICES to it. Under NOSET_CUDA_VISIBLE_DEVICES=1 Ray does not,
    and every rank saw all its node's GPUs and ran on GPU 0, beside the node's other ranks and instances: the actor's
    own runtime_env turns the variable off for it alone (Ray merges it over the job's), so Ray sets
    CUDA_VISIBLE_DEVICES to the GPU it gave the actor, as on any cluster. A CPU rank gets no runtime_env: one starts
    a worker process of its own where an idle one would do."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    gpus = bundle.get("GPU", 0.0)
    options: dict[str, object] = {
        "name": name, "namespace": NAMESPACE, "max_restarts": 0, "num_cpus": 0 if gpus else 1, "num_gpus": gpus,
        "resources": {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
        "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)}
    if gpus:
        options["runtime_env"] = {"env_vars": {NOSET_CUDA_VISIBLE_DEVICES: "0"}}
    return options


class RayActors:
    """Places, starts, watches and removes the instances' placement groups and actors through `ray`."""

    def __init__(self, ray: ModuleType, cfg: DeploymentConfig, log_dir: Path, say: Callable[[str], None]) -> None:
        self.ray, self.cfg, self.log_dir, self.say = ray, cfg, log_dir, say
        self.token = cfg.kv_transfer.engine_id[:8]  # names this deployment's actors and placement groups

    def place(self, run: RayRun) -> None:
        """Ask Ray for the instance's placement group (placing -> starting once Ray has placed it)."""
        from ray.util import placement_group

        run.pg = placement_group(run.placement.bundles, strategy=run.placement.strategy,
                                 name=f"pdlaunch-{self.token}-{run.name}-r{run.record.restarts}")
        run.pg_ready = run.pg.ready()
        run.placed_by = time.monotonic() + self.cfg.launcher.ray_placement_timeout_seconds
        run.state = "placing"

    def placed(self, run: RayRun) -> bool:
        """True once the placement group is placed; RayDeploymentFailed past the timeout."""
        assert run.pg_ready is not None
        done, _ = self.ray.wait([run.pg_ready], timeout=0)
        if done:
            return True
        if time.monotonic() > run.placed_by:
            raise RayDeploymentFailed(
                unplaced_message(self.ray, run.name, run.placement, self.cfg.launcher.ray_placement_timeout_seconds),
                field="launcher.ray_placement_timeout_seconds",
                hint="free room on the cluster (`ray status` shows what holds it: other jobs, or this deployment's "
                "instances placed first), add nodes with those resources, lower the TP size or the instance count, "
                "or change launcher.ray_resources")
        return False

    def _bundle_nodes(self, pg: PlacementGroup) -> list[tuple[str, int | None]] | None:
        """The address of the node holding each bundle of `pg` and its raylet's port (None where Ray lists none), in
        bundle order (None: a node is gone)."""
        table = self.ray.util.placement_group_table(pg)
        nodes = {str(n["NodeID"]): (str(n["NodeManagerAddress"]), int(n["NodeManagerPort"]) if n.get("NodeManagerPort")
                                    else None) for n in self.ray.nodes() if n.get("Alive")}
        by_bundle = {int(k): str(v) for k, v in dict(table.get("bundles_to_node_id") or {}).items()}
        found = [nodes.get(by_bundle.get(i, "")) for i in range(len(pg.bundle_specs))]
        return None if None in found else [n for n in found if n is not None]

    def launch(self, run: RayRun, prefill_side_channels: str) -> bool:
        """The placement group is placed: start the instance's actors in its bundles (False: a node of the
        group died between placement and now, and nothing was started). A decode is told the prefills'
        side channels (HOST:PORT,...)."""
        from pdlaunch.distributed.ray_rank import RayRank
        from pdlaunch.launcher.backends.ray_instance import RayInstance

        assert run.pg is not None
        nodes = self._bundle_nodes(run.pg)
        if nodes is None:
            return False
        hosts = [host for host, _ in nodes]
        run.raylet = RayletProbe(hosts[0], nodes[0][1]) if nodes[0][1] is not None else None
        restart = run.record.restarts
        engine_id = run.plan.spec.engine_id + (f"-r{restart}" if restart else "")
        spec = run.plan.spec.model_copy(update={"host": hosts[0], "engine_id": engine_id,
                                                "devices": [0] * run.plan.spec.tp if run.plan.spec.devices else []})
        run.spec = spec
        env = {"PYTHONUNBUFFERED": "1"}
        if spec.role == "decode":
            env[PREFILL_SIDE_CHANNELS_ENV] = prefill_side_channels
        base = f"pdlaunch-{self.token}-{run.name}-r{restart}"

        def options(rank: int) -> dict[str, object]:
            assert run.pg is not None
            return rank_actor_options(f"{base}-rank{rank}", run.pg, rank, run.placement.bundles[rank])

        ranks = []
        for rank in range(1, spec.tp):
            cfg = self._config_on(hosts[0], hosts[rank])
            ranks.append(self.ray.remote(concurrency_groups={CONTROL: 1})(RayRank).options(**options(rank)).remote(
                rank, cfg.model_dump_json(), spec.model_copy(update={"host": hosts[rank]}).model_dump_json(),
                str(self.log_dir / f"{run.name}-rank{rank}.log"), env))
        leader = self.ray.remote(concurrency_groups={CONTROL: 2, WATCH: 2})(RayInstance).options(**options(0)).remote(
            run.name, str(run.log_path), env)
        run.actors = [leader, *ranks]
        run.serve_ref = leader.serve.remote(self._config_on(hosts[0], hosts[0]).model_dump_json(),
                                            spec.model_dump_json(), ranks)
        run.state = "starting"
        run.started = time.monotonic()
        where = ", ".join(f"rank {r} on {h}" for r, h in enumerate(hosts))
        self.say(f"{run.name}: placed ({run.placement.strategy}; {where}); engine_id {engine_id}; "
                 f"log {run.log_path}")
        return True

    def _config_on(self, rank0_host: str, host: str) -> DeploymentConfig:
        """The config as a rank on `host` runs it: the rendezvous at rank 0's node, its own side channel."""
        cfg = self.cfg.model_copy(deep=True)
        cfg.parallel.master_addr = rank0_host
        cfg.kv_transfer.side_channel_host = host
        return cfg

    def remove(self, run: RayRun) -> None:
        """Kill the instance's actors and remove its placement group (idempotent)."""
        for actor in run.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except (ValueError, self.ray.exceptions.RayError):
                pass  # gone already
        run.actors = []
        run.serve_ref = None
        if run.unreachable is not None:
            run.unreachable.close()
        run.unreachable = None
        if run.raylet is not None:
            run.raylet.close()
        run.raylet = None
        if run.pg is not None:
            self.ray.util.remove_placement_group(run.pg)
            run.pg = None
            run.pg_ready = None

    def exit_of(self, run: RayRun) -> str | None:
        """How the instance's rank 0 ended ("exited with code 1", "lost its Ray actor (why)"), None while it serves,
        or while its actor is unreachable within ray_unreachable.UNREACHABLE_GRACE_S."""
        if run.serve_ref is None:
            return None
        if run.unreachable is not None:
            return self._still_unreachable(run, run.unreachable)
        if run.raylet is not None:  # while healthy, until one is accepted: does a connect from here reach it? (only
            run.raylet.check_healthy(time.monotonic())  # then is its refusal trusted; ray_unreachable.py)
        done, _ = self.ray.wait([run.serve_ref], timeout=0)
        if not done:
            return None
        try:
            code = self.ray.get(run.serve_ref)
        except self.ray.exceptions.RayTaskError as exc:  # serve raised: the cause, not Ray's task headline
            killed = outside_kill(str(exc))  # a rank actor killed (rank 0's watchdog quotes Ray's death cause)
            return f"failed in its Ray actor ({ray_failure(exc)})" + (f"; that actor ended by {killed}" if killed
                                                                      else "")
        except self.ray.exceptions.ActorUnavailableError as exc:  # may come back unless its node's raylet is gone
            node = run.spec.host if run.spec is not None else "?"
            now = time.monotonic()
            run.unreachable = Unreachable(node, now, unavailable_why(exc),
                                          raylet=run.raylet)
            gone = run.unreachable.over(now)  # a raylet seen accepting refuses at once: no grace said, then ended
            if gone is not None:
                return gone
            self.say(run.unreachable.said(run.name))
            return self._still_unreachable(run, run.unreachable)
        except self.ray.exceptions.RayError as exc:
            return self._lost(exc)
        killed = self._rank_killed(run) if code != 0 else None
        return exit_text(code) + (f" ({killed})" if killed else "")

    def _lost(self, exc: BaseException) -> str:
        """How an instance whose rank-0 actor Ray failed with `exc` (not a task's own exception) ended."""
        if not isinstance(exc, self.ray.exceptions.RayActorError):
            return f"lost its Ray actor ({ray_failure(exc)})"
        if getattr(exc, "actor_init_failed", False):  # e.g. log_dir not writable on its node
            return f"could not start its Ray actor ({ray_failure(exc)})"
        # the OOM killer or Ray's memory monitor: said as the local launcher says it, not Ray's paragraph
        return f"lost its Ray actor ({outside_kill(str(exc)) or ray_failure(exc)})"

    def _still_unreachable(self, run: RayRun, lost: Unreachable) -> str | None:
        """Ask the unreachable rank-0 actor again (one call at a time): None while the grace runs or once it answered
        (its end watched anew), how it ended once Ray reports it dead or the grace is over."""
        if lost.probe is not None:
            done, _ = self.ray.wait([lost.probe], timeout=0)
            if done:
                probe, lost.probe = lost.probe, None
                try:
                    self.ray.get(probe)
                except self.ray.exceptions.ActorUnavailableError as exc:
                    lost.why = unavailable_why(exc)
                except self.ray.exceptions.RayError as exc:
                    return self._lost(exc)
                else:
                    lost.close()
                    run.unreachable = None
                    run.serve_ref = run.actors[0].served.options(concurrency_group=WATCH).remote()
                    self.say(f"{run.name}: its Ray actor on node {lost.node} answers again after "
                             f"{time.monotonic() - lost.since:.0f}s; it is kept serving")
                    return None
        over = lost.over(time.monotonic())
        if over is None and lost.probe is None:
            lost.probe = run.actors[0].node_address.options(concurrency_group=CONTROL).remote()
        return over

    def _rank_killed(self, run: RayRun) -> str | None:
        """Which of the instance's ranks 1..T-1 a kill from outside ended (while it was built or while it served), said
        as ray_killed.py says it; None when none was. Rank 0 exits with code 1 when a rank's actor dies (its log names
        the rank and Ray's death cause): the cause is read again here from a call to each rank's actor, which Ray
        fails with it at once when the actor is dead. A call that failed otherwise (it raised: RayTaskError; another
        RayError) is that rank's failure, named by its cause."""
        refs = [actor.node_address.remote() for actor in run.actors[1:]]
        if not refs:
            return None
        done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=RANK_PROBE_TIMEOUT_S)
        for rank, ref in enumerate(refs, start=1):
            if ref not in done:
                continue
            try:
                self.ray.get(ref)
            except self.ray.exceptions.ActorUnavailableError as exc:
                return f"its TP rank {rank} actor is unreachable (Ray: {unavailable_why(exc)})"
            except self.ray.exceptions.RayActorError as exc:
                killed = outside_kill(str(exc))
                if killed is not None:
                    return f"its TP rank {rank} actor ended by {killed}"
            except self.ray.exceptions.RayError as exc:  # its call raised (RayTaskError), or Ray failed it otherwise
                return f"its TP rank {rank} actor failed ({ray_failure(exc)})"
        return None

    def stop(self, runs: list[RayRun], drain: bool, hurry: Callable[[], bool]) -> None:
        """Ask every instance to stop (its server drains when `drain`), wait for them, then kill every actor
        and remove every placement group; `hurry()` turning true ends the wait at once."""
        refs = []
        for run in runs:
            if run.actors and run.serve_ref is not None and not hurry():
                refs.append(run.serve_ref)
                run.actors[0].stop.options(concurrency_group=CONTROL).remote()
        if refs:
            timeout = STOP_TIMEOUT_S if drain else INSTANCE_TERM_TIMEOUT_S
            self.say(f"waiting up to {timeout:.0f}s for {len(refs)} instance(s) to stop, then removing their "
                     "actors and placement groups")
            self._wait_stopped(refs, timeout, hurry)
        for run in runs:
            self.remove(run)

    def _wait_stopped(self, refs: list[ObjectRef[int]], timeout: float, hurry: Callable[[], bool]) -> None:
        """Until every `serve` call in `refs` returned, `timeout` seconds passed, or `hurry()` turned true."""
        deadline = time.monotonic() + timeout
        while refs and not hurry():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            _, refs = self.ray.wait(refs, num_returns=len(refs), timeout=min(HURRY_POLL_S, left))
