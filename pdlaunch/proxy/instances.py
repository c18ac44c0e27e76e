"""The instances behind the proxy: their health, their in-flight counts, and how one is picked."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import httpx

from pdlaunch.http.errors import OpenAIError

log = logging.getLogger("pdlaunch.proxy")

Role = Literal["prefill", "decode", "colocated"]
State = Literal["starting", "ready", "unhealthy", "down"]
HEALTH_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 2.0


@dataclass
class Instance:
    role: Role
    url: str  # http://host:port, no trailing slash
    name: str
    state: State = "starting"
    in_flight: int = 0
    detail: str = ""  # why it is not ready
    engine_id: str = ""  # as its /health last said; a restarted instance answers with a new one

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "role": self.role, "url": self.url, "state": self.state,
                "in_flight": self.in_flight, "detail": self.detail, "engine_id": self.engine_id}

    @contextmanager
    def lease(self) -> Iterator[Instance]:
        """Counts a leg in flight on this instance (least_loaded reads it)."""
        self.in_flight += 1
        try:
            yield self
        finally:
            self.in_flight -= 1


def _engine_id(response: httpx.Response) -> str:
    """The engine_id a pdlaunch instance's /health names ("" for an instance that names none)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    engine_id = body.get("engine_id") if isinstance(body, dict) else None
    return engine_id if isinstance(engine_id, str) else ""


class RoundRobin:
    """Candidates in turn, one counter per role."""

    def __init__(self) -> None:
        self._counters: dict[str, Iterator[int]] = {}

    def choose(self, role: str, candidates: list[Instance]) -> Instance:
        counter = self._counters.setdefault(role, itertools.count())
        return candidates[next(counter) % len(candidates)]


class LeastLoaded:
    """Fewest legs in flight at this proxy; ties go round robin so equal instances share work."""

    def __init__(self) -> None:
        self._tie_break = RoundRobin()

    def choose(self, role: str, candidates: list[Instance]) -> Instance:
        fewest = min(c.in_flight for c in candidates)
        return self._tie_break.choose(role, [c for c in candidates if c.in_flight == fewest])


POLICIES: dict[str, type[RoundRobin | LeastLoaded]] = {"round_robin": RoundRobin, "least_loaded": LeastLoaded}


class InstancePool:
    """All instances, a background health check, and the routing policy."""

    def __init__(self, instances: list[Instance], policy: str = "round_robin") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {sorted(POLICIES)}")
        self.instances = instances
        self.policy = POLICIES[policy]()
        self._task: asyncio.Task[None] | None = None

    @property
    def colocated(self) -> bool:
        return any(i.role == "colocated" for i in self.instances)

    def required_roles(self) -> list[str]:
        return ["colocated"] if self.colocated else ["prefill", "decode"]

    def pick(self, role: str) -> Instance:
        """A ready instance of `role`, or a 503 saying why there is none."""
        of_role = [i for i in self.instances if i.role == role]
        ready = [i for i in of_role if i.state == "ready"]
        if not ready:
            states = ", ".join(f"{i.name} {i.state}" for i in of_role) or "none configured"
            raise OpenAIError(503, f"no {role} instance is ready ({states})", code="no_instance")
        return self.policy.choose(role, ready)

    def ready(self) -> bool:
        return all(any(i.role == r and i.state == "ready" for i in self.instances) for r in self.required_roles())

    def mark_down(self, instance: Instance, why: str) -> None:
        if instance.state != "down":
            log.warning("%s (%s) marked down: %s", instance.name, instance.url, why)
        instance.state = "down"
        instance.detail = why

    async def check_all(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self._check(client, i) for i in self.instances))

    async def _check(self, client: httpx.AsyncClient, instance: Instance) -> None:
        try:
            response = await client.get(f"{instance.url}/health", timeout=HEALTH_TIMEOUT_S)
        except httpx.HTTPError as exc:
            if instance.state != "starting":
                self.mark_down(instance, f"health check failed: {type(exc).__name__}")
            return
        if response.status_code == 200:
            engine_id = _engine_id(response)
            if instance.state != "ready":
                log.info("%s (%s) is ready (engine_id %s)", instance.name, instance.url, engine_id or "unknown")
            elif instance.engine_id and engine_id != instance.engine_id:
                # Restarted between two checks: it was never seen down, but it is a new engine.
                log.warning("%s (%s) restarted: engine_id %s -> %s", instance.name, instance.url,
                            instance.engine_id, engine_id)
            instance.state, instance.detail, instance.engine_id = "ready", "", engine_id
        else:
            instance.state = "unhealthy" if instance.state != "starting" else "starting"
            instance.detail = f"/health answered {response.status_code}"

    def start_monitor(self, client: httpx.AsyncClient) -> None:
        async def loop() -> None:
            while True:
                try:
                    await self.check_all(client)
                except Exception:  # noqa: BLE001 - the monitor must outlive one bad round
                    log.exception("health check round failed")
                await asyncio.sleep(HEALTH_INTERVAL_S)

        self._task = asyncio.create_task(loop())

    async def stop_monitor(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
