"""A running deployment: instance processes and the proxy, their readiness, and their orderly stop.

Used by `pdlaunch serve` (with signals and supervision) and `pdlaunch smoke` / tests (programmatic).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.engine_ids import planned_engine_id
from pdlaunch.config.port_reservations import PortReservations
from pdlaunch.config.rules.host import DEPLOYMENT_FILE
from pdlaunch.http.auth import internal_headers
from pdlaunch.launcher.child_commands import PROXY_TMP_DIR_FLAG, instance_argv, proxy_argv, proxy_env
from pdlaunch.launcher.deployment_secret import with_deployment_secret, write_private
from pdlaunch.launcher.health_identity import (
    is_remote_instance,
    lists_instances,
    names_engine_id,
    not_seen_ready,
    remote_identity,
)
from pdlaunch.launcher.log_dir_lock import LogDirLock
from pdlaunch.launcher.plan import (
    DeploymentPlan,
    InstancePlan,
    check_side_channel_reach,
    instance_config,
    plan_deployment,
)
from pdlaunch.launcher.process import ChildProcess, signals_deferred, stop_all
from pdlaunch.launcher.readiness import READY_TIMEOUT_S, ReadyWait
from pdlaunch.launcher.spawn import spawn_children
from pdlaunch.launcher.stall_watch import NOT_ITSELF, health_state
from pdlaunch.launcher.status import StatusRow, StatusView
from pdlaunch.model.demo import resolve_model_path

HTTP_TIMEOUT_S = 2.0
INSTANCE_TERM_TIMEOUT_S = 5.0


class Deployment:
    def __init__(self, cfg: DeploymentConfig, console: Console | None = None, log_dir: Path | None = None,
                 drain_timeout_s: float | None = None) -> None:
        check_side_channel_reach(cfg)
        self.cfg = cfg = with_deployment_secret(cfg)
        self.console = console or Console()
        self.log_dir = Path(log_dir or cfg.log_dir)
        # In-flight requests finish at the proxy for this long before the instances are stopped.
        self.drain_timeout_s = cfg.supervision.drain_timeout_seconds if drain_timeout_s is None else drain_timeout_s
        # Its ports are held against other launchers on this host from the plan until stop() (port_reservations.py).
        self.reservations = PortReservations()
        try:
            self.plan: DeploymentPlan = plan_deployment(cfg, self.reservations)
        except BaseException:
            self.reservations.release()
            raise
        self.instances: list[ChildProcess] = []
        self.ranks: list[ChildProcess] = []  # this node's ranks of instances whose rank 0 is on another node
        self.proxy: ChildProcess | None = None
        self.rows: dict[str, StatusRow] = {}
        # /info and /metrics need a credential when the deployment has an API key: the internal token.
        self._http = httpx.Client(trust_env=False, timeout=HTTP_TIMEOUT_S,
                                  headers=internal_headers(cfg.security.deployment_secret))
        self._stopping = False
        self.deployment_file = self.log_dir / DEPLOYMENT_FILE
        # No second run writes into a live deployment's log_dir.
        self._log_lock = LogDirLock(self.log_dir, cfg.parallel.node_rank)
        self.left_running: list[str] = []  # after stop(): children still alive past their SIGKILL
        self._ended: list[ChildProcess] = []  # remote ranks that ended cleanly (their logs still close on stop)
        self.engine_ids = {p.spec.name: p.spec.engine_id for p in self.plan.local}  # current ones: restarts renew them
        # The base of other nodes' engine_ids: the config's when it sets one; else each node draws its own uuid.
        self._shared_base = cfg.kv_transfer.engine_id if "engine_id" in cfg.kv_transfer.model_fields_set else None

    @property
    def proxy_url(self) -> str | None:
        return self.plan.proxy_url

    @property
    def children(self) -> list[ChildProcess]:
        return self.instances + self.ranks + ([self.proxy] if self.proxy is not None else [])

    def url_of(self, name: str) -> str:
        for plan in self.plan.instances:
            if plan.spec.name == name:
                return plan.url
        raise KeyError(name)

    # -- start ---------------------------------------------------------------------------------------
    def start(self, ready_timeout: float = READY_TIMEOUT_S, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Start the instances, wait until they answer /health, then the proxy likewise. Where every instance is
        this node's, the proxy starts with them, not after them: its own start (~3 s of imports on a loaded 2-core
        host) overlaps their model loads, and it takes instances still starting as such (no request goes to one
        before its /health answers 200; the proxy's /health is 503 until every role has a ready instance). Other
        nodes' instances are awaited first, as another server may answer at their addresses.

        Returns False when `should_stop()` turned true meanwhile. Raises ChildExited if a child died,
        PdlaunchError if not everything was ready within `ready_timeout` seconds. Call it on a thread that
        outlives the deployment: the ranks it starts for other nodes' instances end with it (parent_death_signal).
        """
        self._log_lock.acquire(self.plan.proxy_url)
        # Fetch/convert a built-in or GGUF model once here, not in every instance at the same time.
        resolve_model_path(self.cfg.model.path, say=lambda text: self.console.print(f"[dim]{text}[/dim]"))
        deployment_file = self.deployment_file
        write_private(deployment_file, instance_config(self.cfg).model_dump_json(indent=2))
        spawn_children(self.cfg, self.plan, deployment_file, self.log_dir, self.rows, self.instances, self.ranks)
        if self.plan.proxy_url is not None:
            self.rows["proxy"] = StatusRow("proxy", "proxy", "-", self.plan.proxy_url, state="waiting")
            if all(p.local for p in self.plan.instances):
                self._start_proxy()
        view = StatusView(self.console, list(self.rows.values()), title=f"pdlaunch: {self.cfg.model.path}")
        view.start()
        wait = ReadyWait(view, self.rows, self.dead_child, time.monotonic() + ready_timeout, ready_timeout, should_stop)
        try:
            if not self._wait_ready(self.instances, wait):
                return False
            if self.plan.proxy_url is None:
                return True
            if not self._wait_remote(wait):
                return False
            proxy = self.proxy or self._start_proxy()
            view.update()
            return self._wait_ready([proxy], wait)
        finally:
            view.stop()

    def _start_proxy(self) -> ChildProcess:
        self.proxy = ChildProcess("proxy", self._proxy_argv(), self.log_dir / "proxy.log", env=self._proxy_env(),
                                  tmp_dir_flag=PROXY_TMP_DIR_FLAG)
        self.proxy.start()
        self.rows["proxy"].state = "starting"
        return self.proxy

    def _proxy_argv(self) -> list[str]:
        return proxy_argv(self.cfg, self.plan.proxy_host, self.plan.proxy_port or 0, self.drain_timeout_s,
                          [(p.spec.role, p.spec.name, p.url) for p in self.plan.instances],
                          {p.spec.name: self._expected_engine_id(p) for p in self.plan.instances})

    def _expected_engine_id(self, plan: InstancePlan) -> str:
        """The engine_id the proxy expects an instance's /health to name: the planned one; another node's launcher
        plans its instances' from its own base unless the config shares one ("*-<name>" then: any base)."""
        return plan.spec.engine_id if plan.local else planned_engine_id(plan.spec.name, self._shared_base)

    def _proxy_env(self) -> dict[str, str]:
        return proxy_env(self.cfg)

    def restart_child(self, child: ChildProcess, restart: int, why: str) -> str:
        """Start a dead local instance or the proxy again, its log appended to. An instance keeps its
        planned ports but gets a new engine_id (planned id + "-r<restart>"): its NIXL agent is new, and
        peers must not reuse what they cached for the dead one. Returns the new engine_id ("" for the proxy). What
        the dead leader left in its group (TP workers, proxy workers) was killed when it was reaped (signal_group from
        Supervisor._ended): its group id, free since, may be another process's now, and is not signalled."""
        if child is self.proxy:
            child.start(note=f"restart {restart} of the proxy ({why})")
            return ""
        plan = next(p for p in self.plan.local if p.spec.name == child.name)
        engine_id = f"{plan.spec.engine_id}-r{restart}"
        spec = plan.spec.model_copy(update={"engine_id": engine_id})
        child.argv = instance_argv(self.deployment_file, InstancePlan(spec, plan.url, plan.local))
        child.start(note=f"restart {restart} of {child.name} ({why}); engine_id {engine_id}")
        self.engine_ids[child.name] = engine_id
        return engine_id

    def health_url(self, child: ChildProcess) -> str:
        base = self.plan.proxy_url if child is self.proxy else self.url_of(child.name)
        assert base is not None, "a proxy child runs only on the node whose plan has a proxy port"
        return base + "/health"

    def _wait_ready(self, children: list[ChildProcess], wait: ReadyWait) -> bool:
        return wait.until(children, lambda child: self._probe(child) == "ready",
                          lambda pending: wait.children_late(pending, self.log_dir))

    def _wait_remote(self, wait: ReadyWait) -> bool:
        """Node 0: wait until every instance other nodes' launchers start answers /health."""
        remote = [plan for plan in self.plan.instances if not plan.local]
        return wait.until(remote, self._remote_ready, lambda pending: wait.remote_late(pending, self._foreign))

    def _foreign(self, plan: InstancePlan) -> str:
        """For the start's timeout: what says that another server answers at a remote instance's address."""
        if self.rows[plan.spec.name].state != NOT_ITSELF:
            return ""
        return f": {NOT_ITSELF}, another server answers its /health, not with {self.remote_identity(plan)}"

    def _remote_ready(self, plan: InstancePlan) -> bool:
        """GET /health of an instance another node's launcher started; updates its status row."""
        try:
            state = health_state(self._http.get(plan.url + "/health"),
                                 lambda response: self.answers_as_remote(plan, response))
        except httpx.HTTPError:
            return False
        if state in ("ready", NOT_ITSELF):
            self.rows[plan.spec.name].state = state
        if state == "ready":
            self.refresh_blocks(plan.spec.name)
        return state == "ready"

    def _probe(self, child: ChildProcess) -> str:
        """GET /health (and /info for block counts) of one child; updates its status row."""
        row = self.rows[child.name]
        try:
            response = self._http.get(self.health_url(child))
        except httpx.HTTPError:
            return row.state
        if response.status_code != 200:
            row.state = "loading"
        elif self.answers_as_itself(child, response):
            # The proxy is ready once it routes to every instance: the launcher found each ready before it asks.
            unseen = not_seen_ready(response, self.plan) if child is self.proxy else []
            row.state = f"sees {', '.join(unseen)}" if unseen else "ready"
            if child is not self.proxy:
                self.refresh_blocks(child.name)
        else:
            row.state = "port taken"  # by another server; the child's own exit (address in use) follows
        return row.state

    def answers_as_itself(self, child: ChildProcess, response: httpx.Response) -> bool:
        """Whether a /health answer at `child`'s address is its own, not that of another server that took the
        port while it loaded (health_identity.py): an instance's names its engine_id, the proxy's lists this
        deployment's instances."""
        if child is self.proxy:
            return lists_instances(response, self.plan)
        return names_engine_id(response, self.engine_ids.get(child.name))

    def answers_as_remote(self, plan: InstancePlan, response: httpx.Response) -> bool:
        """Whether a /health answer at the address of an instance another node runs is that instance's, not
        another server's that took the port (while that node's launcher restarted it, say): it names the
        instance's role and an engine_id that node's launcher gives it (`remote_identity`)."""
        return is_remote_instance(plan, response, self._shared_base)

    def remote_identity(self, plan: InstancePlan) -> str:
        """What `answers_as_remote` expects, for messages."""
        return remote_identity(plan, self._shared_base)

    def refresh_blocks(self, name: str, timeout: float = HTTP_TIMEOUT_S) -> None:
        try:
            info = self._http.get(self.url_of(name) + "/info", timeout=timeout).json()
        except (httpx.HTTPError, ValueError):  # ValueError: not JSON, not even text
            return
        # Whatever answers at the instance's address (another server on a remote node's port) is checked.
        info = info if isinstance(info, dict) else {}
        used, total = info.get("num_blocks_used"), info.get("num_blocks_total")
        self.rows[name].blocks_used = used if isinstance(used, int) else None
        self.rows[name].blocks_total = total if isinstance(total, int) else None

    # -- supervise and stop --------------------------------------------------------------------------
    def dead_child(self, only: list[ChildProcess] | None = None) -> tuple[ChildProcess, int] | None:
        """A child (of `only`, default all) that ended, with its exit code, if any. A remote rank that ended
        cleanly (its rank 0 on another node shut its instance down) is no failure: it is reaped and dropped."""
        for child in list(self.children if only is None else only):
            code = child.poll()
            if code == 0 and child in self.ranks:
                self.ranks.remove(child)
                self._ended.append(child)
                self.rows[child.name].state = "ended"
                self.console.print(f"{child.name} ended: its instance on another node stopped", highlight=False)
                continue
            if code is not None:
                return child, code
        return None

    def stop(self, drain: bool = True, hurry: Callable[[], bool] | None = None) -> None:
        """Proxy first (it drains in-flight requests up to drain_timeout_s), then every instance;
        SIGTERM, then SIGKILL after a timeout, or as soon as `hurry()` turns true (a second Ctrl-C).
        Every child is reaped; an instance already dead, or that dies while the proxy drains, at once (what is left
        of its group, a TP worker holding its GPU memory, is killed then, not after the drain). Safe to call twice."""
        if self._stopping:
            return
        self._stopping = True
        try:
            self._reap_ended()
            if self.proxy is not None:
                def reap_or_hurry() -> bool:  # asked every HURRY_POLL_S while the proxy drains
                    self._reap_ended()
                    return hurry is not None and hurry()

                self.proxy.stop(self.drain_timeout_s + 2.0 if drain else 0.5, reap_or_hurry)
            hurried = hurry is not None and hurry()
            stop_all(self.instances + self.ranks, INSTANCE_TERM_TIMEOUT_S if drain and not hurried else 0.5, hurry)
        except BaseException:
            # Interrupted (a second Ctrl-C where the handler raises: smoke, bench compare): a second call is a
            # no-op, so what still runs is killed and reaped now, not left serving after the launcher gave up.
            with signals_deferred():
                stop_all(self.children, 0.0)
            raise
        finally:
            # A process SIGKILL did not end (stuck in the kernel: an uninterruptible device or NFS wait): named,
            # so that serve does not say everything was reaped.
            self.left_running = [f"{c.name} (pid {c.pid})" for c in self.children if c.running]
            for child in self.children + self._ended:
                child.close_log()
            self._http.close()
            self._log_lock.release()
            self.reservations.release()

    def _reap_ended(self) -> None:
        """Kill what is left of the group of every instance (or remote rank) whose leader ended, and remove its
        directory: once per run (ChildProcess._end_group), so calling this often is cheap."""
        for child in self.instances + self.ranks:
            if child.popen is not None and not child.running:
                child.signal_group(signal.SIGKILL)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

