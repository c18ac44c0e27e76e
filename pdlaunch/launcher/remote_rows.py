"""Node 0's rows of the instances other nodes run: they follow each instance's /health, as its own node's launcher
starts, restarts and stops it.

Node 0 (the proxy's) has no process of these instances, only their addresses: the start's wait sets a row ready
(Deployment.start), then the stall watch's probes of its /health (stall_watch.py) move it on (ready, loading,
stalled, down, and "not this instance" where another server answers there: Deployment.answers_as_remote). Apart
from the supervisor's restarts of this node's own processes because nothing here is restarted or killed: a row
only says what its /health said, and counts for supervision.role_down_grace_seconds while it says ready or
sleeping. Another node has no such rows (`plans` is empty there).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import httpx

from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.plan import InstancePlan
from pdlaunch.launcher.stall_watch import NOT_ITSELF, StallWatch

REMOTE_LIVE = frozenset({"ready", "sleeping"})  # /health states that count another node's instance live (`live`)


class RemoteRows:
    """The rows of `deployment`'s instances that other nodes run, on node 0; none on another node."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        # node 0's rows of instances other nodes run: set ready by the start's wait, then by their /health
        self.plans = ([p for p in deployment.plan.instances if not p.local]
                      if deployment.plan.proxy_url is not None else [])

    def health_urls(self) -> dict[str, str]:
        """What the stall watch probes for them: name -> /health URL."""
        return {p.spec.name: p.url + "/health" for p in self.plans}

    def identities(self) -> dict[str, Callable[[httpx.Response], bool]]:
        """name -> whether a 200 /health answer there is that instance's own (stall_watch.health_state)."""
        return {p.spec.name: partial(self.deployment.answers_as_remote, p) for p in self.plans}

    def follow(self, stall_watch: StallWatch, stall_timeout_s: float, say: Callable[[str], None]) -> None:
        """Each row takes what its instance's /health said last, and a change of readiness is said."""
        for plan in self.plans:
            self._follow(plan, stall_watch, stall_timeout_s, say)

    def _follow(self, plan: InstancePlan, stall_watch: StallWatch, stall_timeout_s: float,
                say: Callable[[str], None]) -> None:
        """The row of an instance another node runs (and restarts) says what its /health said last."""
        name, row = plan.spec.name, self.deployment.rows[plan.spec.name]
        health = stall_watch.health(name)
        if health is None or health == row.state:
            return
        where = f"{name} on node {plan.node} ({plan.url})"
        if health == NOT_ITSELF:
            say(f"{where} is {'no longer ready' if row.state == 'ready' else 'not ready'}: another server "
                f"answers its /health, not with {self.deployment.remote_identity(plan)}; check what listens "
                f"on node {plan.node}'s port {plan.spec.port} (the proxy may still send it requests)")
        elif row.state == "ready":
            what = {"down": "refuses connections",
                    "stalled": f"has not answered within {stall_timeout_s:g}s"}.get(health, f"says {health}")
            say(f"{where} is no longer ready: its /health {what}; node "
                f"{plan.node}'s launcher supervises it, and the proxy routes around it meanwhile")
        elif health == "ready":
            say(f"{where} answers /health again")
        row.state = health

    def refresh_blocks(self, timeout: float) -> None:
        """The KV blocks column of the rows that say ready."""
        for plan in self.plans:
            if self.deployment.rows[plan.spec.name].state == "ready":
                self.deployment.refresh_blocks(plan.spec.name, timeout=timeout)

    def roles(self) -> set[str]:
        return {p.spec.role for p in self.plans}

    def live(self, role: str) -> bool:
        """Whether one of them of `role` is live: its /health says ready or sleeping (put to sleep on purpose). A
        stalled one (no answer) cannot be told from a node that is gone."""
        return any(self.deployment.rows[p.spec.name].state in REMOTE_LIVE for p in self.plans if p.spec.role == role)

    def states(self, role: str) -> list[str]:
        """Each one of `role` with its row's state and where it runs, for the message of a role that stayed down."""
        rows = self.deployment.rows
        return [f"{p.spec.name} {rows[p.spec.name].state} (on node {p.node} at {p.url}; node "
                f"{p.node}'s launcher restarts it, and its log is there)"
                for p in self.plans if p.spec.role == role]
