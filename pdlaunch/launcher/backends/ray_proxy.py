"""`--backend ray`: the proxy, a child process of the launcher on this machine, that knows each instance at
the address of the node Ray placed it on; started once every instance is ready, restarted when one moved,
and supervised as the local supervisor supervises it (proxy.restart, the backoff, supervision.max_restarts, a restart
killed when not ready in time, a ready one that stops answering /health shown as stalled and killed to be restarted
after supervision.stall_restart_seconds (ray_stall.py), supervision.role_down_grace_seconds through
ray_deployment.py)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.backends.ray_run import RayDeploymentFailed, RayRun
from pdlaunch.launcher.backends.ray_stall import RayStalls
from pdlaunch.launcher.child_commands import PROXY_TMP_DIR_FLAG, proxy_argv, proxy_env
from pdlaunch.launcher.plan import DeploymentPlan
from pdlaunch.launcher.process import ChildProcess
from pdlaunch.launcher.readiness import POLL_S, READY_TIMEOUT_S
from pdlaunch.launcher.restart_policy import GiveUp, ProcessRecord, RestartPolicy, on_exit


class RayProxy:
    """The proxy's process (None until started), the URL it knows each instance at, its restart record."""

    def __init__(self, cfg: DeploymentConfig, plan: DeploymentPlan, log_dir: Path, http: httpx.Client,
                 say: Callable[[str], None], stalls: RayStalls) -> None:
        self.cfg, self.plan, self.log_dir, self.http, self.say = cfg, plan, log_dir, http, say
        self.stalls = stalls
        self.process: ChildProcess | None = None
        self.urls: dict[str, str] = {}  # instance name -> URL the running proxy knows it at
        self.record = ProcessRecord("proxy", "proxy", "proxy.restart", cfg.proxy.restart)
        self.last_start = "its first start"  # why the running process was started: the not-ready-in-time message

    def start(self, runs: list[RayRun], note: str | None) -> None:
        """Start (or restart, with `note`) the proxy with every instance at its current address."""
        assert self.plan.proxy_port is not None
        self.stalls.forget(RayStalls.PROXY)  # a new process: the old one's stall is not its own, nor its kill
        self.record.killed_for = ""
        self.last_start = note or "its first start"
        self.urls = {r.name: r.url or r.plan.url for r in runs}
        argv = proxy_argv(self.cfg, self.plan.proxy_host, self.plan.proxy_port,
                          self.cfg.supervision.drain_timeout_seconds,
                          [(r.plan.spec.role, r.name, self.urls[r.name]) for r in runs],
                          {r.name: r.plan.spec.engine_id for r in runs})
        if self.process is None:
            self.process = ChildProcess("proxy", argv, self.log_dir / "proxy.log", env=proxy_env(self.cfg),
                                        tmp_dir_flag=PROXY_TMP_DIR_FLAG)
        else:
            self.process.stop(1.0)
            self.process.argv = argv
        self.process.start(note=note)

    def restart_moved(self, runs: list[RayRun], now: float, why: str) -> None:
        """Start the running proxy again with an instance's new address (`why`: it moved). The new process loads as
        after any restart: not live and not watched for stalls until it answers, killed when not ready in time, and
        its exit before then a failed restart (supervision.max_restarts); a ready proxy's outage begins here."""
        record = self.record
        if record.ready:
            record.outage_cause, record.failures = f"was started again: {why}", 0
        self.start(runs, note=why)
        record.ready, record.started = False, now

    def answers(self) -> bool:
        try:
            self.http.get(f"{self.plan.proxy_url}/health")
        except httpx.HTTPError:
            return False
        return True

    def wait_ready(self, deadline: float, should_stop: Callable[[], bool]) -> bool:
        """Until the started proxy answers (True) or a stop signal came (False); RayDeploymentFailed when it
        exited or did not answer by `deadline` (monotonic)."""
        while not self.answers():
            if should_stop():
                return False
            assert self.process is not None
            if self.process.poll() is not None:
                self.process.signal_group(signal.SIGKILL)  # reaped: its workers and --tmp-dir go now (see check)
                outside = self.process.outside_kill()  # the OOM killer, most often
                raise RayDeploymentFailed(f"the proxy {self.process.describe_exit()} while starting"
                                          + (f" ({outside})" if outside else ""),
                                          hint=f"its log: {self.process.log_path}", log_path=self.process.log_path)
            if time.monotonic() > deadline:
                raise RayDeploymentFailed(f"the proxy did not answer within {READY_TIMEOUT_S:.0f}s",
                                          hint=f"its log: {self.process.log_path}", log_path=self.process.log_path)
            time.sleep(POLL_S)
        return True

    def check(self, runs: list[RayRun], now: float, policy: RestartPolicy) -> None:
        """A proxy that exited is restarted as the local supervisor does: proxy.restart, the backoff and
        supervision.max_restarts (restarts in a row that never answered) apply, a restart that has not
        answered within READY_TIMEOUT_S is killed (its exit a failed restart), and a ready one that is alive but has
        not answered /health for supervision.stall_restart_seconds (stalled: stopped, hung) is killed to restart it."""
        proxy, record = self.process, self.record
        if proxy is None:
            return
        if record.due is None and proxy.poll() is not None:
            # Reaped: what is left of its group (its workers) is killed and its --tmp-dir removed now, as the local
            # supervisor does (Supervisor._ended), not at the restart after the backoff or at the stop.
            proxy.signal_group(signal.SIGKILL)
            self.stalls.forget(RayStalls.PROXY)
            outside = None if record.killed_for else proxy.outside_kill()  # the OOM killer, most often
            how, record.killed_for = record.killed_for or proxy.describe_exit(), ""  # SIGKILL alone does not say why
            decision = on_exit(record, how, now, policy)
            if isinstance(decision, GiveUp):
                said = f"{decision.reason}; it ended by {outside}" if outside else decision.reason
                raise RayDeploymentFailed(f"{said} (log: {proxy.log_path})", log_path=proxy.log_path)
            self.say(f"the proxy {record.last_exit}; restarting it in {decision.delay:.1f}s (log {proxy.log_path})"
                     + (f" ({outside})" if outside else ""))
        elif record.due is not None and now >= record.due:
            record.due, record.started = None, now
            record.restarts += 1
            self.start(runs, note=f"restart {record.restarts} of the proxy ({record.last_exit})")
        elif record.due is None and not record.ready:
            if self.answers():
                record.ready = True
            elif now - record.started > READY_TIMEOUT_S:
                # Stuck while starting: killed, as the local supervisor does; its exit then counts as a failed restart.
                self.say(f"the proxy is not ready {READY_TIMEOUT_S:.0f}s after its last start ({self.last_start}); "
                         f"killing it (log {proxy.log_path})")
                record.started = now
                proxy.signal_group(signal.SIGKILL)
        elif record.due is None:  # ready and running: stalled?
            assert self.plan.proxy_url is not None
            stalled = self.stalls.check_proxy(proxy.pid, self.plan.proxy_url)
            if stalled is not None:
                self.say(f"the proxy (pid {proxy.pid}) {stalled}; killing it to restart it (log {proxy.log_path})")
                record.killed_for = f"{stalled} and killed to restart it"
                proxy.signal_group(signal.SIGKILL)  # a stopped process dies of SIGKILL too; its exit restarts it

    @property
    def live(self) -> bool:
        """Running and ready since its last (re)start: what supervision.role_down_grace_seconds watches."""
        return self.process is not None and self.process.poll() is None and self.record.live

    def outage(self) -> str:
        """What began the proxy's outage, then how its restarts end (as the local supervisor says it)."""
        record = self.record
        later = f"; its last restart {record.last_exit}" if record.failures else ""
        return f"it {record.outage_cause or 'did not answer'}{later}"

    def stop(self, drain: bool, hurry: Callable[[], bool]) -> None:
        """Let it drain (up to the drain timeout, when `drain`) and stop; killed once `hurry()` turns true."""
        if self.process is not None:
            self.process.stop(self.cfg.supervision.drain_timeout_seconds + 2.0 if drain else 0.5, hurry)
            self.process.close_log()
