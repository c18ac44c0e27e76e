"""`pdlaunch serve` after startup: restart this node's dead instances and the proxy, or give up clearly.

A dead instance is restarted with backoff on its planned ports and with a new engine_id
(Deployment.restart_child); meanwhile the proxy routes around it (it marks an unreachable instance
down and its health monitor brings it back). A process that is alive but does not answer /health in
time (SIGSTOPped, hung, swapped out) is shown as stalled (stall_watch.py), apart from a dead one, and
killed to be restarted once it has been stalled for supervision.stall_restart_seconds (when set).
A dead prefill or decode is forgotten by its peers before it restarts (forget_peers.py): a peer's mapping of
its GPU memory would keep that memory allocated, and the restarted instance would find it taken.
Ranks this node runs for instances whose rank 0 is on another node are not restarted: a failing one
stops this node, as before. Node 0 (the proxy's) shows the instances other nodes run too (remote_rows.py): their rows
follow their /health (ready, loading, stalled, down), as their own node's launcher restarts them, and say
"not this instance" where another server answers there (Deployment.answers_as_remote), and count for
supervision.role_down_grace_seconds, which node 0 applies to every role; another node, to the roles wholly its own.
"""

from __future__ import annotations

import signal
import time

import httpx
from rich.console import Console

from pdlaunch.errors import PdlaunchError
from pdlaunch.http.auth import internal_headers
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.forget_peers import FORGET_TIMEOUT_S, KV_ROLES, TRANSPORT_TITLES, Peer, PeerForget, http_ask
from pdlaunch.launcher.log_space import LogSpaceWatch
from pdlaunch.launcher.process import ChildProcess
from pdlaunch.launcher.readiness import READY_TIMEOUT_S, ChildExited
from pdlaunch.launcher.remote_rows import RemoteRows
from pdlaunch.launcher.restart_policy import GiveUp, ProcessRecord, RestartPolicy, RoleWatch, on_exit
from pdlaunch.launcher.stall_watch import StallWatch
from pdlaunch.launcher.status import StatusView

PROBE_TIMEOUT_S = 1.0
BLOCKS_REFRESH_S = 2.0  # how often the status table's KV blocks column asks each instance's /info
BLOCKS_TIMEOUT_S = 1.0


class SupervisionFailed(PdlaunchError):
    """The deployment cannot keep serving: restarts keep failing, are off, or a role stayed down."""

    def __init__(self, message: str, child: ChildProcess) -> None:
        self.child = child
        super().__init__(message)  # the message names the log file(s)


def _records(deployment: Deployment) -> list[tuple[ChildProcess, ProcessRecord]]:
    cfg = deployment.cfg
    group_of: dict[str, int] = {}
    plans = iter(deployment.plan.instances)  # planned group after group, `count` each
    for g, group in enumerate(cfg.instances):
        for _ in range(group.count):
            group_of[next(plans).spec.name] = g
    out = []
    for child in deployment.instances:
        g = group_of[child.name]
        out.append((child, ProcessRecord(child.name, cfg.instances[g].role, f"instances[{g}].restart",
                                         cfg.instances[g].restart)))
    if deployment.proxy is not None:
        out.append((deployment.proxy, ProcessRecord("proxy", "proxy", "proxy.restart", cfg.proxy.restart)))
    return out


def _outage(record: ProcessRecord) -> str:
    """The first cause of the process's outage (what the user has to fix), then how its restarts end."""
    if not record.outage_cause:
        return "it is running"
    later = f"; its last restart {record.last_exit}" if record.failures else ""
    return f"it {record.outage_cause}{later}"


class Supervisor:
    """Call `tick()` a few times a second while serving; it raises SupervisionFailed (or ChildExited for
    a rank of another node's instance) when the deployment has to stop."""

    def __init__(self, deployment: Deployment, console: Console) -> None:
        self.deployment = deployment
        self.console = console
        self.policy = RestartPolicy.from_config(deployment.cfg.supervision)
        self.records = _records(deployment)
        self.remote = RemoteRows(deployment)  # node 0's rows of instances other nodes run
        # Node 0 sees every instance (the others' through their /health), so it judges every role, one with instances
        # on several nodes too; another node sees only its own, and judges only the roles wholly its own.
        local_roles = {r.role for _, r in self.records}
        self.roles = sorted(local_roles | self.remote.roles() if deployment.plan.proxy_url is not None
                            else local_roles - {p.spec.role for p in deployment.plan.instances if not p.local})
        self.role_watch = RoleWatch(self.policy.grace_s)
        self.view = StatusView(console, list(deployment.rows.values()),
                               title=f"pdlaunch: {deployment.cfg.model.path}")
        self._http = httpx.Client(trust_env=False, timeout=PROBE_TIMEOUT_S)
        self._blocks_due = 0.0
        self.stall_timeout_s = deployment.cfg.proxy.health_timeout_seconds
        self.stall_restart_s = deployment.cfg.supervision.stall_restart_seconds
        self.stall_watch = StallWatch({r.name: deployment.health_url(c) for c, r in self.records}
                                      | self.remote.health_urls(), self.stall_timeout_s,
                                      is_itself=self.remote.identities())
        for name in self.remote.health_urls():
            self.stall_watch.watch(name, True)
        self._stalled: set[str] = set()  # names shown as stalled
        self.ask_forget = http_ask(internal_headers(deployment.cfg.security.deployment_secret))
        self.forget_timeout_s = FORGET_TIMEOUT_S
        self._forgets: dict[str, PeerForget] = {}  # dead instance -> its peers' forget, awaited at its restart
        self.log_space = LogSpaceWatch(deployment.log_dir)  # a full log disk loses lines silently: said (log_space.py)

    def __enter__(self) -> Supervisor:
        self.view.start(print_rows=False)
        self.stall_watch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stall_watch.stop()
        self.view.stop()
        self._http.close()

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._check_ranks()
        for child, record in self.records:
            row = self.deployment.rows[record.name]
            if record.due is None and child.poll() is not None:
                self._ended(child, record, now)
            elif record.due is not None and now >= record.due:
                record.due = None
                self._peers_forgot(record.name)
                record.restarts += 1
                record.started = now
                try:
                    engine_id = self.deployment.restart_child(child, record.restarts, record.last_exit)
                except PdlaunchError as exc:  # its log cannot be opened (a full or read-only disk), or no process
                    self._not_restarted(child, record, exc, now)
                    continue
                row.state = f"restarting ({record.restarts})"
                new_id = f" with engine_id {engine_id}" if engine_id else ""
                self._say(f"{record.name}: restart {record.restarts}{new_id} (log: {child.log_path})")
            elif record.due is not None:
                continue
            elif record.ready:
                self._check_stall(child, record)
                continue
            elif now - record.started > READY_TIMEOUT_S:
                # Stuck while starting: kill it; its exit then counts as a failed restart.
                self._say(f"{record.name} is not ready {READY_TIMEOUT_S:.0f}s after restart {record.restarts}; "
                          "killing it")
                record.started = now
                child.signal_group(signal.SIGKILL)
            elif self._answers(child):
                record.ready = True
                row.state = "ready"
                self._say(f"{record.name} is ready again after restart {record.restarts}")
                if child is not self.deployment.proxy:
                    self.deployment.refresh_blocks(record.name)
        self.remote.follow(self.stall_watch, self.stall_timeout_s, self._say)
        for line in self.log_space.check(now):
            self._say(line)
        self._check_roles(now)
        if now >= self._blocks_due:  # the KV blocks column follows the load, not just the moment of readiness
            self._blocks_due = now + BLOCKS_REFRESH_S
            for child, record in self.records:
                # not a stalled one: its /info would hold this loop (and the status rows) for the whole timeout
                if (record.ready and child is not self.deployment.proxy and child.poll() is None
                        and record.name not in self._stalled):
                    self.deployment.refresh_blocks(record.name, timeout=BLOCKS_TIMEOUT_S)
            self.remote.refresh_blocks(BLOCKS_TIMEOUT_S)
        self.view.update()

    def _check_stall(self, child: ChildProcess, record: ProcessRecord) -> None:
        """A ready process that has stopped answering /health (alive: its exit was checked first) is
        shown as stalled, and killed for a restart after supervision.stall_restart_seconds."""
        name, row = record.name, self.deployment.rows[record.name]
        self.stall_watch.watch(name, True)
        stalled_for = self.stall_watch.stalled_for(name)
        if stalled_for is None:
            if name in self._stalled:
                self._stalled.discard(name)
                row.state = "ready"
                self._say(f"{name} (pid {child.pid}) answers /health again; no longer stalled")
            return
        if name not in self._stalled:
            self._stalled.add(name)
            row.state = "stalled"
            if self.stall_restart_s is None:
                then = "it is left running (supervision.stall_restart_seconds is unset)"
            else:
                then = f"it is restarted after supervision.stall_restart_seconds: {self.stall_restart_s:g}s"
            what = self._around(record)
            self._say(f"{name} (pid {child.pid}) is stalled: alive, but /health has not answered within "
                      f"{self.stall_timeout_s:g}s (stopped, hung or swapping?); {what}; {then}")
        if self.stall_restart_s is not None and stalled_for >= self.stall_restart_s:
            self._say(f"{name} (pid {child.pid}) has been stalled for {stalled_for:.0f}s "
                      f"(supervision.stall_restart_seconds: {self.stall_restart_s:g}); killing it to restart it")
            self._forget_stall(name)
            record.killed_for = (f"was stalled for {stalled_for:.0f}s (no /health answer; supervision."
                                 f"stall_restart_seconds: {self.stall_restart_s:g}) and killed to restart it")
            child.signal_group(signal.SIGKILL)  # a stopped process dies of SIGKILL too; its exit restarts it

    def _around(self, record: ProcessRecord) -> str:
        """What a stall of `record` means for requests: the proxy routes around it only to another ready instance."""
        if record.role == "proxy":
            return "clients wait"
        others = any(r.role == record.role and r.name != record.name and r.live and c.running
                     and r.name not in self._stalled for c, r in self.records) or self.remote.live(record.role)
        if others:
            return "the proxy routes around it"
        return (f"no other {record.role} instance is ready, so the proxy has none to send its requests to until it "
                "answers")

    def _forget_stall(self, name: str) -> None:
        self.stall_watch.watch(name, False)
        self._stalled.discard(name)

    def _ended(self, child: ChildProcess, record: ProcessRecord, now: float) -> None:
        # The workers a dead TP leader left in its group hold their GPU memory: they go now, not at the restart
        # (after the backoff, and when the group's id may have been taken by another process).
        child.signal_group(signal.SIGKILL)
        self._forget_stall(record.name)
        outside = None if record.killed_for else child.outside_kill()  # the OOM killer, most often
        reason = None if record.killed_for else child.exit_reason()  # its own `exiting: ...` log line
        how = record.killed_for or child.describe_exit() + (f": {reason}" if reason else "")
        record.killed_for = ""
        delay = self._restart_after(child, record, how, now, outside)
        self._say(f"{record.name} (pid {child.pid}) {how}; restart {record.restarts + 1} in {delay:.1f}s"
                  + (f" ({outside})" if outside else ""))
        self._forget(record)

    def _not_restarted(self, child: ChildProcess, record: ProcessRecord, exc: PdlaunchError, now: float) -> None:
        """A restart that could not start the process is a failed restart, retried after the backoff: it ended the
        whole deployment, the other instances' requests cut, with the startup hint `pass --log-dir DIR`."""
        delay = self._restart_after(child, record, f"could not be restarted ({exc.message})", now)
        self._say(f"{record.name}: restart {record.restarts} failed: {exc.message}; restart {record.restarts + 1} "
                  f"in {delay:.1f}s (the other processes run on)")

    def _restart_after(self, child: ChildProcess, record: ProcessRecord, how: str, now: float,
                       outside: str | None = None) -> float:
        """The supervision policy's answer to `record` ending `how`: SupervisionFailed when it gives up (`outside`: who
        sent the SIGKILL that ended it, ChildProcess.outside_kill), else its row marked restarting and the seconds until
        the restart."""
        decision = on_exit(record, how, now, self.policy)
        row = self.deployment.rows[record.name]
        row.blocks_used = row.blocks_total = None  # the dead process's count: its blocks went with it
        if isinstance(decision, GiveUp):
            row.state = "failed"
            self.view.update()
            said = f"{decision.reason}; it ended by {outside}" if outside else decision.reason
            raise SupervisionFailed(f"{said} (log: {child.log_path})", child)
        row.state = f"restarting ({record.restarts + 1})"
        return float(decision.delay)

    def _forget(self, record: ProcessRecord) -> None:
        """Ask the dead instance's peers to forget its engine, from now until its restart (forget_peers.py): the
        prefill and decode instances that are ready and alive (another node's: that its /health said so, or, on a
        node without the proxy, that the plan has its URL)."""
        title = TRANSPORT_TITLES.get(self.deployment.cfg.kv_transfer.connector)
        engine_id = self.deployment.engine_ids.get(record.name)
        if record.role not in KV_ROLES or title is None or not engine_id:
            return
        dead = {r.name for c, r in self.records if c.poll() is not None}  # also those this tick has not reached
        peers = [Peer(p.spec.name, p.url) for p in self.deployment.plan.instances
                 if p.spec.role in KV_ROLES and p.spec.name not in dead | {record.name}
                 and self.deployment.rows[p.spec.name].state in ("ready", "remote")]
        if peers:
            self._forgets[record.name] = PeerForget(record.name, engine_id, peers, self.ask_forget, title,
                                                    self.forget_timeout_s)

    def _peers_forgot(self, name: str) -> None:
        """Before `name` restarts: wait for its peers' forget (at most until its deadline) and say how it went."""
        forget = self._forgets.pop(name, None)
        if forget is not None:
            for line in forget.wait():
                self._say(line)

    def _answers(self, child: ChildProcess) -> bool:
        """An instance is ready when /health says 200; the proxy once it answers at all (it says 503 while
        an instance role is down, which is not the proxy's fault). Either answer must be the child's own,
        not that of a server that took its port while it was down (Deployment.answers_as_itself)."""
        try:
            response = self._http.get(self.deployment.health_url(child))
        except httpx.HTTPError:
            return False
        return ((child is self.deployment.proxy or response.status_code == 200)
                and self.deployment.answers_as_itself(child, response))

    def _check_ranks(self) -> None:
        dead = self.deployment.dead_child(only=self.deployment.ranks)
        if dead is not None:
            raise ChildExited(*dead)

    def _check_roles(self, now: float) -> None:
        """Stop when a role has had no live instance for the grace. Another node's instance is live while its /health
        says ready or sleeping (put to sleep on purpose; a local one that sleeps is live too): a stalled one (no
        answer) cannot be told from a node that is gone."""
        rows = self.deployment.rows
        live = {role: any(r.live for c, r in self.records if r.role == role and c.running) or self.remote.live(role)
                for role in self.roles}
        role = self.role_watch.overdue(live, now)
        if role is None:
            return
        members = [(c, r) for c, r in self.records if r.role == role]
        states = "; ".join([f"{r.name} {rows[r.name].state} ({_outage(r)}; log {c.log_path})" for c, r in members]
                           + self.remote.states(role))
        what = "the proxy has not been live" if role == "proxy" else f"no live {role} instance"
        child = members[0][0] if members else self.deployment.proxy  # its log says how the proxy saw them go
        assert child is not None, "a role without local instances is judged only on node 0, which runs the proxy"
        raise SupervisionFailed(
            f"{what} for {self.role_watch.down_for(role, now):.0f}s "
            f"(supervision.role_down_grace_seconds: {self.policy.grace_s:g}): {states}", child)

    def _say(self, text: str) -> None:
        self.console.print(f"[pdlaunch] {text}", highlight=False, markup=False, soft_wrap=True)
