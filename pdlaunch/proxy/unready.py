"""Why an instance gets no requests, and for how long, in the words a client and an operator read: the 503
`no_instance` names each instance of the role with its state and why (a client read only `no decode instance is
ready (decode-0 unhealthy)` while the launcher restarted it), and a /health refusal carries the state the instance
says it is in.

That 503's Retry-After is when the role should have a ready instance again, from what the deployment does: the
launcher restarts a dead instance after supervision.restart_backoff_seconds (the proxy's --restart-backoff), and
the instance then loads its model. The proxy sees each restart (the instance ready again under a new engine_id)
and expects the next outage of that instance to last as long as its last restart took, less the time it has been
out already; before it has seen one, the backoff plus NO_INSTANCE_LOAD_S. What it cannot know: whether the launcher
doubled its backoff after a restart that failed (that restart's process never answered), so an outage past what
the last restart took gets another wait as long, at most OVERDUE_RETRY_AFTER_S. An instance asleep comes back only
when someone POSTs /wake_up: a role with only such instances gets no Retry-After (a wait does not end it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# A pdlaunch instance's /health says `status`: loading, sleeping, failed, ... Anything else (another server's page)
# is not quoted: the detail is shown to clients.
_STATE_WORD = re.compile(r"[a-z_]{1,32}")
# The load of an instance the proxy has not yet seen restart: the tiny and demo models on CPU take 2-4 s, so the
# default backoff (1 s) and this give the 5 s this 503 always said; a larger model's first restart is learnt from.
NO_INSTANCE_LOAD_S = 4.0
# At most this: the openai client waits for a Retry-After of up to 60 s in place of its own backoff, and ignores a
# longer one; a restart that takes longer is past its retries either way.
NO_INSTANCE_MAX_S = 60
OVERDUE_RETRY_AFTER_S = 5.0
# /health states that no wait ends: someone must wake the instance.
NO_END_STATES = frozenset({"sleeping"})


class Unready(Protocol):
    """What these messages read of an instance (instances.py's Instance, which imports this module)."""

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> str: ...

    @property
    def detail(self) -> str: ...

    @property
    def health_state(self) -> str: ...

    @property
    def outage(self) -> Outage: ...


@dataclass
class Outage:
    """When an instance stopped being ready (monotonic seconds; None while ready), and how long its last restart
    took, from leaving ready to ready again under a new engine_id (None: none seen). A stall starts no outage: the
    instance is alive until supervision.stall_restart_seconds has it killed, and only then does its restart begin
    (counted in, the stall made the next outage's wait the stall's and the restart's together)."""

    since: float | None = None
    last_restart_s: float | None = None

    def observe(self, ready: bool, now: float, restarted: bool = False, stalled: bool = False) -> None:
        """A probe's finding: ready or not (`stalled`: alive, its /health silent); `restarted`, ready under another
        engine_id than before."""
        if not ready:
            if self.since is None and not stalled:
                self.since = now
            return
        if self.since is not None and restarted:
            self.last_restart_s = now - self.since
        self.since = None

    def ready_in(self, restart_backoff_s: float, now: float) -> float:
        """Seconds until the instance should be ready again (at least 1)."""
        expected = self.last_restart_s if self.last_restart_s is not None else restart_backoff_s + NO_INSTANCE_LOAD_S
        left = expected - (now - self.since if self.since is not None else 0.0)
        if left > 0:  # not overdue yet: its last second too (a retry then may find it back)
            return max(1.0, left)
        return max(1.0, min(expected, OVERDUE_RETRY_AFTER_S))


def health_state(body: dict[str, object]) -> str:
    """The state a pdlaunch instance's /health refusal names (`loading`), or "" where it names none."""
    state = body.get("status")
    return state if isinstance(state, str) and _STATE_WORD.fullmatch(state) else ""


def health_refusal(status: int, body: dict[str, object]) -> str:
    """`/health answered 503 (loading)`, or without the state when the body names none."""
    state = health_state(body)
    return f"/health answered {status}" + (f" ({state})" if state else "")


def no_instance_retry_after(of_role: Sequence[Unready], restart_backoff_s: float, now: float) -> int | None:
    """The Retry-After of the 503 that no instance of a role is ready (whole seconds, 1..NO_INSTANCE_MAX_S): the
    soonest any of `of_role` should be ready again; None when none comes back without being woken."""
    waits = [i.outage.ready_in(restart_backoff_s, now) for i in of_role if i.health_state not in NO_END_STATES]
    if of_role and not waits:
        return None
    soonest = min(waits, default=restart_backoff_s + NO_INSTANCE_LOAD_S)
    return min(NO_INSTANCE_MAX_S, max(1, math.ceil(soonest - 1e-6)))


def none_ready_message(role: str, of_role: Sequence[Unready]) -> str:
    """Each instance of `role` with its state and why, and what the client does."""
    states = "; ".join(f"{i.name} {i.state}" + (f": {i.detail}" if i.detail else "") for i in of_role)
    asleep = bool(of_role) and all(i.health_state in NO_END_STATES for i in of_role)
    then = ("POST /wake_up to wake them (they take no requests until then)" if asleep
            else "retry with backoff (GET /instances shows each instance's state)")
    return f"no {role} instance is ready ({states or 'none configured'}); {then}"
