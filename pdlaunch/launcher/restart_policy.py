"""When a dead process is restarted, and when the launcher gives up: pure decisions, no processes.

A process that dies after it was ready is restarted after `restart_backoff_seconds`; one that dies
again before it was ready counts as a failed restart, and each failure doubles the wait (at most
MAX_BACKOFF_S). `max_restarts` failed restarts in a row, or a role with no live process for longer
than `role_down_grace_seconds`, stop the deployment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdlaunch.config.launcher_config import SupervisionConfig

MAX_BACKOFF_S = 30.0
MAX_DOUBLINGS = 64  # a backoff_s of a nanosecond or more has reached MAX_BACKOFF_S by then


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float
    max_restarts: int
    grace_s: float

    @classmethod
    def from_config(cls, cfg: SupervisionConfig) -> RestartPolicy:
        return cls(cfg.restart_backoff_seconds, cfg.max_restarts, cfg.role_down_grace_seconds)

    def delay(self, failures: int) -> float:
        """Seconds to wait before the next restart after `failures` failed restarts in a row."""
        # 2.0 ** 1024 raises OverflowError: a large max_restarts gets there after hours of failed restarts
        doubled = self.backoff_s * 2.0 ** min(failures, MAX_DOUBLINGS)
        return min(doubled, max(MAX_BACKOFF_S, self.backoff_s))


@dataclass
class ProcessRecord:
    """What the supervisor knows of one local process (an instance with all its ranks, or the proxy)."""

    name: str
    role: str  # prefill | decode | colocated | proxy
    restart_field: str  # the config key that turns restarts of this process on or off
    restart: bool
    restarts: int = 0  # restarts so far: N in "restart N" and in engine_id "-rN"
    failures: int = 0  # restarts in a row that died before they were ready
    ready: bool = True  # ready since its last (re)start; the launcher only supervises a started deployment
    due: float | None = None  # dead, to be restarted at this monotonic time
    started: float = 0.0  # monotonic time of the last restart
    last_exit: str = ""  # "was killed by signal 9 (SIGKILL)"
    outage_cause: str = ""  # how it ended when it was last live: the first cause of the current outage
    killed_for: str = ""  # why the supervisor killed it ("was stalled for 40s ..."): its exit says only SIGKILL

    @property
    def live(self) -> bool:
        return self.ready and self.due is None


@dataclass(frozen=True)
class Restart:
    at: float  # monotonic time
    delay: float


@dataclass(frozen=True)
class GiveUp:
    reason: str


def on_exit(record: ProcessRecord, how: str, now: float, policy: RestartPolicy) -> Restart | GiveUp:
    """Record that the process ended (`how`: "was killed by signal 9 (SIGKILL)") and decide what follows."""
    record.last_exit = how
    if record.ready:
        record.outage_cause = how
    if not record.restart:
        return GiveUp(f"{record.name} {how}, and restarts are off for it ({record.restart_field}: false)")
    if policy.max_restarts == 0:
        return GiveUp(f"{record.name} {how}, and restarts are off (supervision.max_restarts: 0)")
    if record.ready:
        record.failures = 0
    else:
        record.failures += 1
        if record.failures >= policy.max_restarts:
            return GiveUp(f"{record.name} {how} before it was ready again: {record.failures} restart(s) in a row "
                          f"failed (supervision.max_restarts: {policy.max_restarts}); the outage began when it "
                          f"{record.outage_cause}")
    record.ready = False
    delay = policy.delay(record.failures)
    record.due = now + delay
    return Restart(record.due, delay)


@dataclass
class RoleWatch:
    """Since when each role has had no live process."""

    grace_s: float
    down_since: dict[str, float] = field(default_factory=dict)

    def overdue(self, live: dict[str, bool], now: float) -> str | None:
        """The first role that has been without a live process for longer than the grace, if any."""
        for role, is_live in live.items():
            if is_live:
                self.down_since.pop(role, None)
                continue
            since = self.down_since.setdefault(role, now)
            if now - since > self.grace_s:
                return role
        return None

    def down_for(self, role: str, now: float) -> float:
        since = self.down_since.get(role)
        return 0.0 if since is None else now - since
