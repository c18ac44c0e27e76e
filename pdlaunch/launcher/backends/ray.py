"""`--backend ray`: serve the deployment on a Ray cluster, supervised through Ray.

This process (the launcher) connects to the cluster at launcher.ray_address and, per instance, makes
one placement group with one bundle per TP rank (config/ray_cluster.py: one GPU each on CUDA, one CPU
otherwise, plus the role's launcher.ray_resources; PACK when one node holds them all, SPREAD
otherwise). Once Ray has placed it, rank 0 is a `RayInstance` actor in bundle 0 (ray_instance.py: the
instance's HTTP server and engine) and ranks 1..T-1 are `RayRank` actors in the other bundles
(distributed/ray_rank.py), driven by rank 0 through Ray calls. The HTTP server, the rendezvous store
and every rank's NIXL side channel bind and advertise the address of the node Ray placed them on.
The proxy runs here, as a child process, and knows each instance at its node's address.

Supervision (launcher/restart_policy.py, as the local supervisor): an instance whose rank-0 `serve`
call ends (the engine failed, an actor died, its node is gone) has its actors and placement group
removed and, after the backoff, is placed again where Ray finds room, with a new engine_id
(planned id + "-r<restart>"); if its address changed, the proxy is restarted with the new one. A
placement group Ray cannot place within launcher.ray_placement_timeout_seconds stops the deployment
(exit 1) naming the resources it asked for. Ctrl-C/SIGTERM: the proxy drains, every instance stops,
then every actor is killed and every placement group removed. A second Ctrl-C/SIGTERM cuts each of
those waits short: the proxy is killed, and so are the instances' actors, without waiting for their
servers to stop. The actors and placement groups are not detached: a launcher that is killed outright
(SIGKILL) takes them with it, as Ray ends what a dead driver owned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import httpx
from rich.console import Console
from rich.markup import escape

from pdlaunch.config.models import DeploymentConfig, InstanceSpec
from pdlaunch.config.ray_cluster import (
    NAMESPACE,
    InstancePlacement,
    RayNode,
    connect,
    live_nodes,
    plan_instance,
)
from pdlaunch.distributed.ray_rank import CONTROL_GROUP, ray_failure
from pdlaunch.errors import PdlaunchError, exit_text
from pdlaunch.kv_transfer.push_params import PREFILL_SIDE_CHANNELS_ENV
from pdlaunch.launcher.backends.ray_head import HeadWatch
from pdlaunch.launcher.deployment import (
    DRAIN_TIMEOUT_S,
    INSTANCE_TERM_TIMEOUT_S,
    POLL_S,
    READY_TIMEOUT_S,
    proxy_argv,
    proxy_env,
    with_deployment_secret,
)
from pdlaunch.launcher.log_dir_lock import LogDirLock
from pdlaunch.launcher.plan import InstancePlan, plan_deployment
from pdlaunch.launcher.process import HURRY_POLL_S, ChildProcess
from pdlaunch.launcher.restart_policy import GiveUp, ProcessRecord, RestartPolicy, RoleWatch, on_exit
from pdlaunch.launcher.serve import StopSignals
from pdlaunch.model.demo import resolve_model_path

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle
    from ray.util.placement_group import PlacementGroup

HEALTH_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 30.0  # instances drain and stop their ranks within this before their actors are killed
CONTROL = CONTROL_GROUP  # the concurrency group of RayInstance.stop and RayRank.until_shutdown

State = Literal["placing", "starting", "ready", "down"]


class RayDeploymentFailed(PdlaunchError):
    """The deployment cannot keep serving on the cluster (restarts keep failing, a placement timed out)."""


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
    serve_ref: ObjectRef[int] | None = None
    spec: InstanceSpec | None = None  # as running now: its node's address, its engine_id
    started: float = 0.0

    @property
    def name(self) -> str:
        return self.plan.spec.name

    @property
    def url(self) -> str | None:
        return None if self.spec is None else f"http://{self.spec.host}:{self.spec.port}"


class RayDeployment:
    """Every instance of `cfg` on the Ray cluster, and the proxy on this machine."""

    def __init__(self, cfg: DeploymentConfig, console: Console) -> None:
        self.ray: ModuleType = connect(cfg)
        self.cfg = cfg = with_deployment_secret(cfg)
        self.console = console
        self.log_dir = Path(cfg.log_dir).resolve()
        self.plan = plan_deployment(cfg)
        self.policy = RestartPolicy.from_config(cfg.supervision)
        self.role_watch = RoleWatch(self.policy.grace_s)
        self.token = cfg.kv_transfer.engine_id[:8]  # names this deployment's actors and placement groups
        self.head = HeadWatch.of(self.ray)
        try:
            nodes = live_nodes(self.ray)
        except self.ray.exceptions.RayError as exc:  # the cluster answered the connect, then failed us
            self.ray.shutdown()
            raise RayDeploymentFailed(f"could not list the Ray cluster's nodes: {exc}", field="launcher.ray_address",
                                      hint="check the cluster with `ray status`, then serve again") from None
        groups = iter(g for g, group in enumerate(cfg.instances) for _ in range(group.count))
        self.runs = [self._run(plan, next(groups), nodes) for plan in self.plan.instances]
        self.proxy: ChildProcess | None = None
        self.proxy_urls: dict[str, str] = {}  # instance name -> URL the running proxy knows it at
        self.proxy_record = ProcessRecord("proxy", "proxy", "proxy.restart", cfg.proxy.restart)
        self._http = httpx.Client(trust_env=False, timeout=HEALTH_TIMEOUT_S)
        self._lock = LogDirLock(self.log_dir)
        self._stopped = False

    def _run(self, plan: InstancePlan, g: int, nodes: list[RayNode]) -> RayRun:
        group = self.cfg.instances[g]
        record = ProcessRecord(plan.spec.name, group.role, f"instances[{g}].restart", group.restart)
        placement = plan_instance(self.cfg, group.role, plan.spec.tp, nodes)
        return RayRun(plan, g, record, placement, self.log_dir / f"{plan.spec.name}.log")

    @property
    def proxy_url(self) -> str | None:
        return self.plan.proxy_url

    def say(self, text: str) -> None:
        self.console.print(f"[pdlaunch] {text}", highlight=False, markup=False, soft_wrap=True)

    # -- placing and starting one instance -----------------------------------------------------------
    def place(self, run: RayRun) -> None:
        """Ask Ray for the instance's placement group (placing -> starting once Ray has placed it)."""
        from ray.util import placement_group

        run.pg = placement_group(run.placement.bundles, strategy=run.placement.strategy,
                                 name=f"pdlaunch-{self.token}-{run.name}-r{run.record.restarts}")
        run.pg_ready = run.pg.ready()
        run.placed_by = time.monotonic() + self.cfg.launcher.ray_placement_timeout_seconds
        run.state = "placing"

    def _placed(self, run: RayRun) -> bool:
        """True once the placement group is placed; RayDeploymentFailed past the timeout."""
        assert run.pg_ready is not None
        done, _ = self.ray.wait([run.pg_ready], timeout=0)
        if done:
            return True
        if time.monotonic() > run.placed_by:
            nodes = "; ".join(f"{n.address} {n.resources}" for n in live_nodes(self.ray))
            raise RayDeploymentFailed(
                f"Ray could not place {run.name}'s placement group within "
                f"{self.cfg.launcher.ray_placement_timeout_seconds:g}s: it asks for {run.placement.describe()} "
                f"(live nodes: {nodes})", field="launcher.ray_placement_timeout_seconds",
                hint="free or add nodes with those resources (`ray status` shows what is in use), lower the TP "
                "size, or change launcher.ray_resources")
        return False

    def _bundle_nodes(self, pg: PlacementGroup) -> list[str] | None:
        """The address of the node holding each bundle of `pg`, in bundle order (None: a node is gone)."""
        table = self.ray.util.placement_group_table(pg)
        address = {str(n["NodeID"]): str(n["NodeManagerAddress"]) for n in self.ray.nodes() if n.get("Alive")}
        by_bundle = {int(k): str(v) for k, v in dict(table.get("bundles_to_node_id") or {}).items()}
        nodes = [address.get(by_bundle.get(i, "")) for i in range(len(pg.bundle_specs))]
        return None if None in nodes else [n for n in nodes if n is not None]

    def launch(self, run: RayRun) -> None:
        """The placement group is placed: start the instance's actors in its bundles."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from pdlaunch.distributed.ray_rank import RayRank
        from pdlaunch.launcher.backends.ray_instance import RayInstance

        assert run.pg is not None
        hosts = self._bundle_nodes(run.pg)
        if hosts is None:  # a node died between placement and now: place the instance again
            run.state = "starting"
            self._ended(run, "lost a node of its placement group before it started", time.monotonic())
            return
        restart = run.record.restarts
        engine_id = run.plan.spec.engine_id + (f"-r{restart}" if restart else "")
        spec = run.plan.spec.model_copy(update={"host": hosts[0], "engine_id": engine_id,
                                                "devices": [0] * run.plan.spec.tp if run.plan.spec.devices else []})
        run.spec = spec
        own = {k: v for k, v in run.placement.bundles[0].items() if k not in ("CPU", "GPU")}
        gpus = run.placement.bundles[0].get("GPU", 0.0)
        env = {"PYTHONUNBUFFERED": "1"}
        if spec.role == "decode":
            env[PREFILL_SIDE_CHANNELS_ENV] = self._prefill_side_channels()
        base = f"pdlaunch-{self.token}-{run.name}-r{restart}"

        def options(rank: int) -> dict[str, object]:
            return {"name": f"{base}-rank{rank}", "namespace": NAMESPACE, "max_restarts": 0,
                    "num_cpus": 0 if gpus else 1, "num_gpus": gpus, "resources": own,
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(run.pg, placement_group_bundle_index=rank)}

        ranks = []
        for rank in range(1, spec.tp):
            cfg = self._config_on(hosts[0], hosts[rank])
            ranks.append(self.ray.remote(concurrency_groups={CONTROL: 1})(RayRank).options(**options(rank)).remote(
                rank, cfg.model_dump_json(), spec.model_copy(update={"host": hosts[rank]}).model_dump_json(),
                str(self.log_dir / f"{run.name}-rank{rank}.log"), env))
        leader = self.ray.remote(concurrency_groups={CONTROL: 2})(RayInstance).options(**options(0)).remote(
            run.name, str(run.log_path), env)
        run.actors = [leader, *ranks]
        run.serve_ref = leader.serve.remote(self._config_on(hosts[0], hosts[0]).model_dump_json(),
                                            spec.model_dump_json(), ranks)
        run.state = "starting"
        run.started = time.monotonic()
        where = ", ".join(f"rank {r} on {h}" for r, h in enumerate(hosts))
        self.say(f"{run.name}: placed ({run.placement.strategy}; {where}); engine_id {engine_id}; "
                 f"log {run.log_path}")

    def _config_on(self, rank0_host: str, host: str) -> DeploymentConfig:
        """The config as a rank on `host` runs it: the rendezvous at rank 0's node, its own side channel."""
        cfg = self.cfg.model_copy(deep=True)
        cfg.parallel.master_addr = rank0_host
        cfg.kv_transfer.side_channel_host = host
        return cfg

    def _prefill_side_channels(self) -> str:
        return ",".join(f"{r.spec.host}:{r.spec.side_channel_port}" for r in self.runs
                        if r.spec is not None and r.spec.role == "prefill" and r.spec.side_channel_port)

    def remove(self, run: RayRun) -> None:
        """Kill the instance's actors and remove its placement group (idempotent)."""
        for actor in run.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except (ValueError, self.ray.exceptions.RayError):
                pass  # gone already
        run.actors = []
        run.serve_ref = None
        if run.pg is not None:
            self.ray.util.remove_placement_group(run.pg)
            run.pg = None
            run.pg_ready = None

    def exit_of(self, run: RayRun) -> str | None:
        """How the instance's rank 0 ended ("exited with code 1", "lost its Ray actor (why)"), None while it serves."""
        if run.serve_ref is None:
            return None
        done, _ = self.ray.wait([run.serve_ref], timeout=0)
        if not done:
            return None
        try:
            code = self.ray.get(run.serve_ref)
        except self.ray.exceptions.RayTaskError as exc:  # serve raised: the cause, not Ray's task headline
            return f"failed in its Ray actor ({ray_failure(exc)})"
        except self.ray.exceptions.RayActorError as exc:
            if getattr(exc, "actor_init_failed", False):  # e.g. log_dir not writable on its node
                return f"could not start its Ray actor ({ray_failure(exc)})"
            return f"lost its Ray actor ({ray_failure(exc)})"
        except self.ray.exceptions.RayError as exc:
            return f"lost its Ray actor ({ray_failure(exc)})"
        return exit_text(code)

    def answers(self, run: RayRun) -> bool:
        try:
            return run.url is not None and self._http.get(f"{run.url}/health").status_code == 200
        except httpx.HTTPError:
            return False

    # -- start -------------------------------------------------------------------------------------
    def start(self, should_stop: Callable[[], bool]) -> bool:
        """Place and start every instance, then the proxy; False when a stop signal came meanwhile."""
        self._lock.acquire(self.plan.proxy_url)
        resolve_model_path(self.cfg.model.path, say=lambda text: self.console.print(f"[dim]{text}[/dim]"))
        for run in self.runs:
            self.place(run)
        self.say(f"ray: {len(self.runs)} placement group(s) asked of the cluster at {self.cfg.launcher.ray_address} "
                 f"(timeout {self.cfg.launcher.ray_placement_timeout_seconds:g}s); logs in {self.log_dir}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while any(r.state != "ready" for r in self.runs):
            if should_stop():
                return False
            self._check_head(time.monotonic())
            prefills_known = all(r.spec is not None for r in self.runs if r.plan.spec.role == "prefill")
            for run in self.runs:
                if run.state == "placing" and self._placed(run):
                    if run.plan.spec.role != "decode" or prefills_known:  # decodes learn the prefills' addresses
                        self.launch(run)
                elif run.state == "down":  # lost a node while being placed
                    self._restart_when_due(run, time.monotonic())
                elif run.state == "starting":
                    how = self.exit_of(run)
                    if how is not None:
                        raise RayDeploymentFailed(f"{run.name} {how} while starting", hint=f"its log: {run.log_path}")
                    if self.answers(run):
                        run.state = "ready"
                        self.say(f"{run.name} is ready at {run.url}")
            if time.monotonic() > deadline:
                late = ", ".join(f"{r.name} ({r.state})" for r in self.runs if r.state != "ready")
                raise RayDeploymentFailed(f"not ready after {READY_TIMEOUT_S:.0f}s: {late}",
                                          hint=f"see the logs in {self.log_dir}")
            time.sleep(POLL_S)
        self.start_proxy(note=None)
        while not self._proxy_answers():
            if should_stop():
                return False
            assert self.proxy is not None
            if self.proxy.poll() is not None:
                raise RayDeploymentFailed(f"the proxy {self.proxy.describe_exit()} while starting",
                                          hint=f"its log: {self.proxy.log_path}")
            if time.monotonic() > deadline:
                raise RayDeploymentFailed(f"the proxy did not answer within {READY_TIMEOUT_S:.0f}s",
                                          hint=f"its log: {self.proxy.log_path}")
            time.sleep(POLL_S)
        return True

    def start_proxy(self, note: str | None) -> None:
        """Start (or restart, with `note`) the proxy with every instance at its current address."""
        assert self.plan.proxy_port is not None
        self.proxy_urls = {r.name: r.url or r.plan.url for r in self.runs}
        argv = proxy_argv(self.cfg, self.plan.proxy_host, self.plan.proxy_port, DRAIN_TIMEOUT_S,
                          [(r.plan.spec.role, r.name, self.proxy_urls[r.name]) for r in self.runs],
                          {r.name: r.plan.spec.engine_id for r in self.runs})
        if self.proxy is None:
            self.proxy = ChildProcess("proxy", argv, self.log_dir / "proxy.log", env=proxy_env(self.cfg))
        else:
            self.proxy.stop(1.0)
            self.proxy.argv = argv
        self.proxy.start(note=note)

    def _proxy_answers(self) -> bool:
        try:
            self._http.get(f"{self.plan.proxy_url}/health")
        except httpx.HTTPError:
            return False
        return True

    # -- supervise ---------------------------------------------------------------------------------
    def tick(self) -> None:
        """One round of supervision; RayDeploymentFailed when the deployment has to stop."""
        now = time.monotonic()
        self._check_head(now)
        for run in self.runs:
            if run.state in ("starting", "ready"):
                how = self.exit_of(run)
                if how is not None:
                    self._ended(run, how, now)
                elif run.state == "starting":
                    self._check_started(run, now)
            elif run.state == "down":
                self._restart_when_due(run, now)
            elif run.state == "placing" and self._placed(run):
                self.launch(run)
        self._check_proxy(now)
        self._check_roles(now)

    def _check_head(self, now: float) -> None:
        lost = self.head.check(now)
        if lost is not None:
            raise RayDeploymentFailed(lost, field="launcher.ray_address",
                                      hint="the head node or its `ray start --head` died, and the actors end "
                                      "with it: start the cluster again, then serve again")

    def _check_proxy(self, now: float) -> None:
        """A proxy that exited is restarted as the local supervisor does: proxy.restart, the backoff and
        supervision.max_restarts (restarts in a row that never answered) apply."""
        proxy, record = self.proxy, self.proxy_record
        if proxy is None:
            return
        if record.due is None and proxy.poll() is not None:
            decision = on_exit(record, proxy.describe_exit(), now, self.policy)
            if isinstance(decision, GiveUp):
                raise RayDeploymentFailed(f"{decision.reason} (log: {proxy.log_path})")
            self.say(f"the proxy {record.last_exit}; restarting it in {decision.delay:.1f}s (log {proxy.log_path})")
        elif record.due is not None and now >= record.due:
            record.due, record.started = None, now
            record.restarts += 1
            self.start_proxy(note=f"restart {record.restarts} of the proxy ({record.last_exit})")
        elif record.due is None and not record.ready and self._proxy_answers():
            record.ready = True

    def _restart_when_due(self, run: RayRun, now: float) -> None:
        record = run.record
        if record.due is not None and now >= record.due:
            record.due = None
            record.restarts += 1
            record.started = now
            self.place(run)
            self.say(f"{run.name}: restart {record.restarts}: placement group asked of Ray")

    def _ended(self, run: RayRun, how: str, now: float) -> None:
        self.remove(run)
        run.state = "down"
        decision = on_exit(run.record, how, now, self.policy)
        if isinstance(decision, GiveUp):
            raise RayDeploymentFailed(f"{decision.reason} (log: {run.log_path})")
        self.say(f"{run.name} {how}; its actors and placement group are removed; restart {run.record.restarts + 1} "
                 f"in {decision.delay:.1f}s, where Ray places it")

    def _check_started(self, run: RayRun, now: float) -> None:
        if self.answers(run):
            run.state = "ready"
            run.record.ready = True
            self.say(f"{run.name} is ready again after restart {run.record.restarts} at {run.url}")
            if run.url != self.proxy_urls.get(run.name) and self.proxy is not None:
                self.say(f"{run.name} moved to {run.url}: restarting the proxy with its new address")
                self.start_proxy(note=f"{run.name} moved to {run.url}")
        elif now - run.started > READY_TIMEOUT_S:
            self.say(f"{run.name} is not ready {READY_TIMEOUT_S:.0f}s after restart {run.record.restarts}; "
                     "removing its actors")
            self._ended(run, "was not ready in time", now)

    def _check_roles(self, now: float) -> None:
        roles = sorted({r.record.role for r in self.runs})
        live = {role: any(r.record.live and r.state == "ready" for r in self.runs if r.record.role == role)
                for role in roles}
        role = self.role_watch.overdue(live, now)
        if role is not None:
            states = "; ".join(f"{r.name} {r.state} (log {r.log_path})" for r in self.runs if r.record.role == role)
            raise RayDeploymentFailed(f"no live {role} instance for {self.role_watch.down_for(role, now):.0f}s "
                                      f"(supervision.role_down_grace_seconds: {self.policy.grace_s:g}): {states}")

    # -- stop --------------------------------------------------------------------------------------
    def stop(self, drain: bool, hurry: Callable[[], bool] | None = None) -> None:
        """Proxy first (it drains), then every instance; then every actor and placement group is removed.
        Each wait ends as soon as `hurry()` turns true (a second Ctrl-C): the proxy is killed, and the
        instances' actors are killed without waiting for their servers to stop."""
        if self._stopped:
            return
        self._stopped = True
        hurried = hurry or (lambda: False)
        try:
            if self.proxy is not None:
                self.proxy.stop(DRAIN_TIMEOUT_S + 2.0 if drain else 0.5, hurried)
                self.proxy.close_log()
            if self.head.lost:  # every Ray call that asks the GCS would block until Ray ends this process
                return
            refs = []
            for run in self.runs:
                if run.actors and run.serve_ref is not None and not hurried():
                    refs.append(run.serve_ref)
                    run.actors[0].stop.options(concurrency_group=CONTROL).remote()
            if refs:
                timeout = STOP_TIMEOUT_S if drain else INSTANCE_TERM_TIMEOUT_S
                self.say(f"waiting up to {timeout:.0f}s for {len(refs)} instance(s) to stop, then removing their "
                         "actors and placement groups")
                self._wait_stopped(refs, timeout, hurried)
            for run in self.runs:
                self.remove(run)
        finally:
            self._http.close()
            self._lock.release()

    def _wait_stopped(self, refs: list[ObjectRef[int]], timeout: float, hurry: Callable[[], bool]) -> None:
        """Until every `serve` call in `refs` returned, `timeout` seconds passed, or `hurry()` turned true."""
        deadline = time.monotonic() + timeout
        while refs and not hurry():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            _, refs = self.ray.wait(refs, num_returns=len(refs), timeout=min(HURRY_POLL_S, left))


def run_ray(cfg: DeploymentConfig) -> int:
    """`pdlaunch serve --backend ray`: 0 after a clean stop, 1 when the deployment could not keep serving."""
    console = Console()
    deployment = RayDeployment(cfg, console)
    with StopSignals() as signals:
        signals.on_second = lambda: console.print("second signal: stopping now", highlight=False)

        def hurry() -> bool:
            return signals.forced

        try:
            if not deployment.start(should_stop=signals.requested.is_set):
                console.print(f"{signals.signal_name or 'stop'} received while starting; stopping")
                deployment.stop(drain=False, hurry=hurry)
                console.print("stopped: every actor and placement group removed", highlight=False)
                return 0
            console.print(f"[green]ready[/green]: OpenAI API at [bold]{deployment.proxy_url}/v1[/bold] "
                          f"(model {cfg.model.path!r}; {len(deployment.runs)} instance(s) on the Ray cluster; logs "
                          f"in {deployment.log_dir}); Ctrl-C to stop", soft_wrap=True)
            while not signals.requested.wait(POLL_S):
                deployment.tick()
            console.print(f"{signals.signal_name} received: draining in-flight requests (up to "
                          f"{DRAIN_TIMEOUT_S:.0f}s), then removing every actor and placement group; Ctrl-C again "
                          "to stop at once", highlight=False, soft_wrap=True)
            deployment.stop(drain=not signals.forced, hurry=hurry)
            console.print("stopped: every actor and placement group removed", highlight=False)
            return 0
        except RayDeploymentFailed as exc:
            console.print(f"[red]error:[/red] {escape(exc.render())}; stopping the deployment", highlight=False,
                          soft_wrap=True)
            deployment.stop(drain=False, hurry=hurry)
            return 1
        except deployment.ray.exceptions.RayError as exc:  # the cluster itself failed us (GCS gone, ...)
            console.print(f"[red]error:[/red] the Ray cluster failed: {escape(str(exc))}; stopping the deployment",
                          highlight=False, soft_wrap=True)
            deployment.stop(drain=False, hurry=hurry)
            return 1
        finally:
            deployment.stop(drain=False, hurry=hurry)
            deployment.ray.shutdown()
