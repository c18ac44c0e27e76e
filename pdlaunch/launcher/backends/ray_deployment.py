"""`--backend ray`: the deployment on the cluster: connected at launcher.ray_address, every instance placed
and started, then the proxy; supervised (each instance restarted where Ray finds room, with the local
supervisor's restart policy; the head watched; a stalled instance or proxy restarted after
supervision.stall_restart_seconds: ray_stall.py; a dead prefill or decode forgotten by its peers before it is placed
again, as the local supervisor does: launcher/forget_peers.py; the log directory's free space watched, as the local
supervisor watches it: launcher/log_space.py); stopped proxy first, then every instance.

The ports the plan hands out are held against every other pdlaunch launcher on this host (config/port_reservations.py)
from the plan until `stop` (every end of the run calls it; a failure while the deployment is made gives them back
there): the proxy's, which runs here, and each instance's HTTP,
rendezvous and side-channel ports, which this launcher picks and bind-tests here, so that an instance Ray places on
this host (a cluster of one machine, or its head) never meets another deployment started here. What is not held:
those ports on the other nodes of the cluster. The names live in this host's kernel, and which node an instance lands
on is known only once Ray has placed it, after its ports were chosen; a launcher there (or on a third machine
reaching it through Ray) may take the same port, and the instance then fails to bind and is placed again, with the
same ports, where Ray finds room (the restart policy's limits apply)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import httpx
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.flag_terms import flag_names_from_env, in_flag_terms
from pdlaunch.config.port_reservations import PortReservations
from pdlaunch.config.ray_cluster import InstancePlacement, connect, live_nodes
from pdlaunch.config.ray_fit import deployment_placements
from pdlaunch.config.ray_init import cluster_words
from pdlaunch.http.auth import internal_headers
from pdlaunch.launcher.backends.ray_actors import RayActors
from pdlaunch.launcher.backends.ray_head import LOST_S, HeadWatch
from pdlaunch.launcher.backends.ray_killed import quiet_worker_deaths
from pdlaunch.launcher.backends.ray_proxy import RayProxy
from pdlaunch.launcher.backends.ray_run import RayDeploymentFailed, RayRun
from pdlaunch.launcher.backends.ray_stall import RayStalls
from pdlaunch.launcher.deployment_secret import with_deployment_secret
from pdlaunch.launcher.forget_peers import FORGET_TIMEOUT_S, KV_ROLES, TRANSPORT_TITLES, Peer, PeerForget, http_ask
from pdlaunch.launcher.log_dir_lock import LogDirLock
from pdlaunch.launcher.log_space import LogSpaceWatch
from pdlaunch.launcher.plan import InstancePlan, plan_deployment
from pdlaunch.launcher.readiness import POLL_S, READY_TIMEOUT_S
from pdlaunch.launcher.restart_policy import GiveUp, ProcessRecord, RestartPolicy, RoleWatch, on_exit

HEALTH_TIMEOUT_S = 2.0


class RayDeployment:
    """Every instance of `cfg` on the Ray cluster, and the proxy on this machine."""

    def __init__(self, cfg: DeploymentConfig, console: Console) -> None:
        self.ray: ModuleType = connect(cfg)
        quiet_worker_deaths(self.ray)  # a dead actor is said in the launcher's line alone, not beside Ray's paragraph
        self.cfg = cfg = with_deployment_secret(cfg)
        self.console = console
        # config path -> the flag that set it, as `pdlaunch serve` hands them over: lines name what the user typed
        self.flags = flag_names_from_env(os.environ)
        self.log_dir = Path(cfg.log_dir).resolve()
        # The plan's ports are held from here until stop() (the module's docstring says which), and the HTTP clients
        # (/health here and on the stall watch's thread) open until then; a failure before stop() is reachable gives
        # them back here, not when the half-made deployment is collected.
        self.reservations = PortReservations()
        self._http = httpx.Client(trust_env=False, timeout=HEALTH_TIMEOUT_S)
        # ready instances and the proxy alive but not answering /health
        self.stalls = RayStalls(cfg, lambda text: self.say(text))
        try:
            self.plan = plan_deployment(cfg, self.reservations)
            self.policy = RestartPolicy.from_config(cfg.supervision)
            self.role_watch = RoleWatch(self.policy.grace_s)
            self.head = HeadWatch.of(self.ray)
            try:
                nodes = live_nodes(self.ray)
            except self.ray.exceptions.RayError as exc:  # the cluster answered the connect, then failed us
                self.ray.shutdown()
                raise RayDeploymentFailed(f"could not list the Ray cluster's nodes: {exc}",
                                          field="launcher.ray_address",
                                          hint="check the cluster with `ray status`, then serve again") from None
            # the placement groups check-config added up against the cluster (config/ray_fit.py), in the plan's order
            placed = deployment_placements(cfg, nodes)
            self.runs = [self._run(plan, g, placement)
                         for plan, (g, placement) in zip(self.plan.instances, placed, strict=True)]
            self.actors = RayActors(self.ray, cfg, self.log_dir, self.say)
            self.proxy = RayProxy(cfg, self.plan, self.log_dir, self._http, lambda text: self.say(text), self.stalls)
            self._lock = LogDirLock(self.log_dir)
            self.log_space = LogSpaceWatch(self.log_dir)  # a full log disk loses the instances' lines silently: said
            self._stopped = False
            self.ask_forget = http_ask(internal_headers(cfg.security.deployment_secret))
            self.forget_timeout_s = FORGET_TIMEOUT_S
            self._forgets: dict[str, PeerForget] = {}  # dead instance -> its peers' forget, awaited before placing it
            self._held: set[str] = set()  # ended instances left as they are while the head does not answer
        except BaseException:  # a stop signal raised here too (ray.py `_connected`)
            self.stalls.stop()  # its probe thread is not started yet: this only closes its client
            self._http.close()
            self.reservations.release()
            raise

    def _run(self, plan: InstancePlan, g: int, placement: InstancePlacement) -> RayRun:
        group = self.cfg.instances[g]
        record = ProcessRecord(plan.spec.name, group.role, f"instances[{g}].restart", group.restart)
        return RayRun(plan, g, record, placement, self.log_dir / f"{plan.spec.name}.log")

    @property
    def proxy_url(self) -> str | None:
        return self.plan.proxy_url

    def say(self, text: str) -> None:
        self.console.print(f"[pdlaunch] {text}", highlight=False, markup=False, soft_wrap=True)

    def launch(self, run: RayRun) -> None:
        """The placement group is placed: start the instance's actors in its bundles."""
        if not self.actors.launch(run, self._prefill_side_channels()):  # a node died since: place it again
            self._ended(run, "lost a node of its placement group before it started", time.monotonic())

    def _prefill_side_channels(self) -> str:
        return ",".join(f"{r.spec.host}:{r.spec.side_channel_port}" for r in self.runs
                        if r.spec is not None and r.spec.role == "prefill" and r.spec.side_channel_port)

    def answers(self, run: RayRun) -> bool:
        try:
            return run.url is not None and self._http.get(f"{run.url}/health").status_code == 200
        except httpx.HTTPError:
            return False

    # -- start -------------------------------------------------------------------------------------
    def start(self, should_stop: Callable[[], bool]) -> bool:
        """Place and start every instance, then the proxy; False when a stop signal came meanwhile."""
        self._lock.acquire(self.plan.proxy_url)  # the model is ready: ray.run_ray fetched or converted it
        for run in self.runs:
            self.actors.place(run)
        self.say(f"ray: {len(self.runs)} placement group(s) asked of "
                 f"{in_flag_terms(cluster_words(self.cfg.launcher.ray_address, self.ray), self.flags)} "
                 f"(timeout {self.cfg.launcher.ray_placement_timeout_seconds:g}s); logs in {self.log_dir}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while any(r.state != "ready" for r in self.runs):
            if should_stop():
                return False
            self._check_head(time.monotonic())
            prefills_known = all(r.spec is not None for r in self.runs if r.plan.spec.role == "prefill")
            for run in self.runs:
                if run.state == "placing" and self.actors.placed(run):
                    if run.plan.spec.role != "decode" or prefills_known:  # decodes learn the prefills' addresses
                        self.launch(run)
                elif run.state == "down":  # lost a node while being placed
                    self._restart_when_due(run, time.monotonic())
                elif run.state == "starting":
                    how = self.actors.exit_of(run)
                    if how is not None and self._head_answers(run, how, time.monotonic()):
                        raise RayDeploymentFailed(f"{run.name} {how} while starting", hint=f"its log: {run.log_path}",
                                                  log_path=run.log_path)
                    if how is None and self.answers(run):
                        # ready for its restart record too: one placed again meanwhile (it lost a node) is live
                        run.state, run.record.ready = "ready", True
                        self.say(f"{run.name} is ready at {run.url}")
            if time.monotonic() > deadline:
                late = ", ".join(f"{r.name} ({r.state})" for r in self.runs if r.state != "ready")
                raise RayDeploymentFailed(f"not ready after {READY_TIMEOUT_S:.0f}s: {late}",
                                          hint=f"see the logs in {self.log_dir}")
            time.sleep(POLL_S)
        self.proxy.start(self.runs, note=None)
        return self.proxy.wait_ready(deadline, should_stop)

    # -- supervise ---------------------------------------------------------------------------------
    def tick(self) -> None:
        """One round of supervision; RayDeploymentFailed when the deployment has to stop."""
        now = time.monotonic()
        self._check_head(now)
        for line in self.log_space.check(now):
            self.say(line)
        for run in self.runs:
            if run.state in ("starting", "ready"):
                how = self.actors.exit_of(run)
                if how is not None:
                    self._ended(run, how, now)
                elif run.state == "starting":
                    self._check_started(run, now)
                elif (stalled := self.stalls.check(run)) is not None:
                    self._ended(run, stalled, now)
            elif run.state == "down":
                self._restart_when_due(run, now)
            elif run.state == "placing" and self.actors.placed(run):
                self.launch(run)
        self.proxy.check(self.runs, now, self.policy)
        self._check_roles(now)

    def _check_head(self, now: float) -> None:
        lost = self.head.check(now)
        if lost is not None:
            raise RayDeploymentFailed(lost, field="launcher.ray_address",
                                      hint="the head node or its `ray start --head` died, and the actors end "
                                      "with it: start the cluster again, then serve again")

    def _restart_when_due(self, run: RayRun, now: float) -> None:
        record = run.record
        if record.due is not None and now >= record.due:
            record.due = None
            forget = self._forgets.pop(run.name, None)
            for line in forget.wait() if forget is not None else []:
                self.say(line)
            record.restarts += 1
            record.started = now
            self.actors.place(run)
            self.say(f"{run.name}: restart {record.restarts}: placement group asked of Ray")

    def _head_answers(self, run: RayRun, how: str, now: float) -> bool:
        """Whether the head's GCS accepts connections now, so that the end of `run` (`how` it ended) can be acted on
        with Ray calls. An actor seen dead while it does not most often died with the head (ray_head.py): then every
        Ray call that asks the GCS would block until Ray ends this process, so the run is left as it is (said once)
        until the GCS answers again or the head watch finds it gone (LOST_S) and the deployment stops."""
        if self.head.answers_now(now):
            self._held.discard(run.name)
            return True
        if run.name not in self._held:
            self._held.add(run.name)
            self.say(f"{run.name} {how}; the Ray cluster's head does not answer (its GCS at {self.head.address}): "
                     f"nothing is removed until it does, and the deployment stops if it has not within "
                     f"{LOST_S:.0f}s")
        return False

    def _ended(self, run: RayRun, how: str, now: float) -> None:
        if not self._head_answers(run, how, now):
            return  # looked at again next tick: the head watch ends the deployment, or the GCS is back
        self.stalls.forget(run.name)
        self.actors.remove(run)
        run.state = "down"
        decision = on_exit(run.record, how, now, self.policy)
        if isinstance(decision, GiveUp):
            raise RayDeploymentFailed(f"{decision.reason} (log: {run.log_path})", log_path=run.log_path)
        self.say(f"{run.name} {how}; its actors and placement group are removed; restart {run.record.restarts + 1} "
                 f"in {decision.delay:.1f}s, where Ray places it")
        title = TRANSPORT_TITLES.get(self.cfg.kv_transfer.connector)
        peers = [Peer(r.name, r.url) for r in self.runs
                 if r is not run and r.state == "ready" and r.url is not None and r.plan.spec.role in KV_ROLES]
        if run.spec is not None and run.plan.spec.role in KV_ROLES and title is not None and peers:
            self._forgets[run.name] = PeerForget(run.name, run.spec.engine_id, peers, self.ask_forget, title,
                                                 self.forget_timeout_s)

    def _check_started(self, run: RayRun, now: float) -> None:
        if self.answers(run):
            run.state = "ready"
            run.record.ready = True
            self.say(f"{run.name} is ready again after restart {run.record.restarts} at {run.url}")
            if run.url != self.proxy.urls.get(run.name) and self.proxy.process is not None:
                # The proxy exited (its restart pending, or its exit not yet seen by proxy.check): the restart that
                # check makes after the backoff reads every address; one now would be stopped again by that one.
                if self.proxy.record.due is not None or self.proxy.process.poll() is not None:
                    self.say(f"{run.name} moved to {run.url}: the proxy's pending restart takes its new address")
                else:
                    self.say(f"{run.name} moved to {run.url}: restarting the proxy with its new address")
                    self.proxy.restart_moved(self.runs, now, f"{run.name} moved to {run.url}")
        elif now - run.started > READY_TIMEOUT_S:
            self.say(f"{run.name} is not ready {READY_TIMEOUT_S:.0f}s after restart {run.record.restarts}; "
                     "removing its actors")
            self._ended(run, "was not ready in time", now)

    def _check_roles(self, now: float) -> None:
        roles = sorted({r.record.role for r in self.runs})
        live = {role: any(r.record.live and r.state == "ready" for r in self.runs if r.record.role == role)
                for role in roles}
        if self.proxy.process is not None:  # watched once started, as the local supervisor watches it
            live["proxy"] = self.proxy.live
        role = self.role_watch.overdue(live, now)
        if role == "proxy":
            assert self.proxy.process is not None
            raise RayDeploymentFailed(f"the proxy has not been live for {self.role_watch.down_for(role, now):.0f}s "
                                      f"(supervision.role_down_grace_seconds: {self.policy.grace_s:g}): "
                                      f"{self.proxy.outage()} (log {self.proxy.process.log_path})",
                                      log_path=self.proxy.process.log_path)
        if role is not None:
            members = [r for r in self.runs if r.record.role == role]
            states = "; ".join(f"{r.name} {r.state} (log {r.log_path})" for r in members)
            raise RayDeploymentFailed(f"no live {role} instance for {self.role_watch.down_for(role, now):.0f}s "
                                      f"(supervision.role_down_grace_seconds: {self.policy.grace_s:g}): {states}",
                                      log_path=members[0].log_path)

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
            self.proxy.stop(drain, hurried)
            if not self.head.answers_now(time.monotonic()):
                # every Ray call that asks the GCS would block until Ray ends this process; Ray ends the actors and
                # placement groups of a driver gone (none is detached), the raylets those of a dead GCS
                if not self.head.lost:
                    self.say(f"the Ray cluster's head does not answer (its GCS at {self.head.address}): the actors "
                             "and placement groups are left to Ray, which ends them with this launcher")
                return
            self.actors.stop(self.runs, drain, hurried)
        finally:
            self.stalls.stop()
            self._http.close()
            self._lock.release()
            self.reservations.release()  # the proxy is stopped and every actor killed (or gone with the head)
