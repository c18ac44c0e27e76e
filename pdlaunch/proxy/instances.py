"""The instances behind the proxy: their health, their in-flight counts, and how one is picked.

The counts (legs in flight, prompt tokens queued or spilled) live on the pool's load board (load_board.py): with
proxy.workers N > 1 every worker's, so that least_loaded, the prefix policy and disaggregation weigh the proxy's
whole load; health states are each worker's own probes.

A /health probe that times out (proxy.health_timeout_seconds, for the whole answer: one that trickles in
is no answer) marks the instance "stalled": it took the connection (the kernel accepts into the listen
backlog even for a SIGSTOPped process) but does not answer: stopped, hung, or swapped out. Like "down",
it gets no new legs until a probe answers. A /health body past HEALTH_MAX_BYTES is not read on: the
instance is unhealthy.

A 200 from another server that took an instance's address (another deployment's instance, or one that moved
to another node) makes the instance unhealthy too: its body names another role, or another engine_id than
the one the launcher planned for it (`Instance.planned_engine_id`, that or that with -rN after a restart; a `*`
in it is the part the instance's start fills in, such as a Kubernetes pod's UID: config/engine_ids.py).
An instance with no planned engine_id (one given by URL alone, such as a vLLM server, which answers an empty
200) is checked by the role its body names, if any; one the launcher planned (a pdlaunch instance, whose /health
always names its engine_id) must name it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import httpx
from pydantic import ValidationError

from pdlaunch.config.engine_ids import FILLED_IN, is_engine_of
from pdlaunch.config.launcher_config import SupervisionConfig
from pdlaunch.engine.kv_capacity import KVCapacity
from pdlaunch.http.answers import AnswerTooLarge, fetch
from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.retry_later import RetryLater
from pdlaunch.proxy.load_board import IN_FLIGHT, LoadBoard
from pdlaunch.proxy.unready import Outage, health_refusal, health_state, no_instance_retry_after, none_ready_message

log = logging.getLogger("pdlaunch.proxy")

Role = Literal["prefill", "decode", "colocated"]
State = Literal["starting", "ready", "unhealthy", "down", "stalled"]
HEALTH_INTERVAL_S = 1.0
# An instance not yet seen ready is probed this often: the launcher announces the deployment ready once the proxy sees
# every instance ready (launcher/deployment.py), and a probe a second would hold that up to a second after the last.
STARTING_INTERVAL_S = 0.2
HEALTH_TIMEOUT_S = 2.0
HEALTH_MAX_BYTES = 64 << 10  # an instance's /health is a few hundred bytes of JSON
RESTART_BACKOFF_S = SupervisionConfig().restart_backoff_seconds  # the launcher's, unless --restart-backoff says


@dataclass
class Instance:
    role: Role
    url: str  # http://host:port, no trailing slash
    name: str
    state: State = "starting"
    detail: str = ""  # why it is not ready
    engine_id: str = ""  # as its /health last said; a restarted instance answers with a new one
    # its streams' mean time between tokens over the last second, as its /health last said (None: it says none)
    itl_ms: float | None = None
    # what its KV cache holds of one request, as its /health last said (None: it says none); a prefill leg carries
    # the decode's, so that the prefill refuses what this decode would (server/decode_limits.py)
    kv_capacity: KVCapacity | None = None
    # the one the launcher planned for it ("" unknown; a * in it: any text, engine_ids.py): its /health must name it
    planned_engine_id: str = ""
    # the state its last /health refusal named ("loading", "sleeping"; "" when it is ready or named none)
    health_state: str = ""
    # since when it is not ready, and how long its last restart took: the Retry-After of no_instance (unready.py)
    outage: Outage = field(default_factory=Outage, repr=False, compare=False)
    # Set while it is stalled: prefill legs waiting on it are abandoned then (prefill_leg.py).
    stalled: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)
    # Its load counts: column group `board_index` of the pool's board (shared by every proxy worker, load_board.py);
    # its own one-row board until a pool takes it.
    board: LoadBoard = field(init=False, repr=False, compare=False)
    board_index: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.board = LoadBoard.in_process([self.name])

    @property
    def in_flight(self) -> int:
        """Legs in flight on it, from every proxy worker."""
        return self.board.total(self.board_index, IN_FLIGHT)

    def count(self, column: int, delta: int) -> None:
        """Add `delta` to this worker's count of `column` (load_board.COLUMNS) on this instance."""
        self.board.add(self.board_index, column, delta)

    def total(self, column: int) -> int:
        """Every worker's count of `column` on this instance."""
        return self.board.total(self.board_index, column)

    def held_count(self, column: int, amount: int) -> Callable[[], None]:
        """Add `amount` to this worker's count of `column` until the returned callable runs (once; later calls do
        nothing)."""
        self.count(column, amount)
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self.count(column, -amount)

        return release

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "role": self.role, "url": self.url, "state": self.state,
                "in_flight": self.in_flight, "detail": self.detail, "engine_id": self.engine_id, "itl_ms": self.itl_ms}

    @contextmanager
    def lease(self) -> Iterator[Instance]:
        """Counts a leg in flight on this instance (least_loaded reads it)."""
        self.count(IN_FLIGHT, 1)
        try:
            yield self
        finally:
            self.count(IN_FLIGHT, -1)


def _health_body(content: bytes) -> dict[str, object]:
    try:
        body = json.loads(content)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _engine_id(body: dict[str, object]) -> str:
    """The engine_id a pdlaunch instance's /health names ("" for an instance that names none)."""
    engine_id = body.get("engine_id")
    return engine_id if isinstance(engine_id, str) else ""


def _itl_ms(body: dict[str, object]) -> float | None:
    """The itl_ms a pdlaunch instance's /health names; None for one that names none (another server) or a value
    that is not a finite non-negative number: such an instance is never held to be busy."""
    value = body.get("itl_ms")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        return None
    return float(value)


def _kv_capacity(body: dict[str, object]) -> KVCapacity | None:
    """The kv_capacity a pdlaunch instance's /health names (engine/kv_capacity.py); None for one that names none
    (another server) or a value that is not one: the decode's KV cache is then left to the decode to check."""
    raw = body.get("kv_capacity")
    try:
        return KVCapacity.model_validate(raw) if raw is not None else None
    except ValidationError:
        return None


def foreign_answer(instance: Instance, body: dict[str, object]) -> str:
    """What says that a 200 /health `body` is another server's, not `instance`'s ("" when nothing does)."""
    said_role = "role" in body and body["role"] != instance.role
    planned = instance.planned_engine_id
    said_engine = bool(planned) and not is_engine_of(body.get("engine_id"), planned)
    if not (said_role or said_engine):
        return ""
    answered = ", ".join(f"{key} {body.get(key)!r}" for key in ("role", "engine_id") if key in body) or "neither"
    expected = f"role {instance.role!r}" + (f" and engine_id {planned!r} ({_planned_note(planned)})"
                                            if planned else "")
    return f"another server answers its /health: it names {answered}, not {expected}"


def _planned_note(planned: str) -> str:
    """How `planned` is matched, for messages."""
    restarted = "or that with -rN after a restart"
    if FILLED_IN not in planned:
        return restarted
    return f"{FILLED_IN}: any text the instance's start fills in, such as its pod's UID; {restarted}"


def _not_healthy(instance: Instance, why: str) -> None:
    """It answers, but not as a healthy instance: unhealthy (still starting, if it was)."""
    instance.state = "unhealthy" if instance.state != "starting" else "starting"
    instance.detail = why


def no_candidate(role: str) -> OpenAIError:
    """A policy asked to choose among no instance: each caller finds the ready ones first, but the health probe may
    mark the last one down between that and the choice (after an await). A 503 (retry), not a crash."""
    return OpenAIError(503, f"no ready {role} instance: the last one was marked down as this request was routed",
                       code="no_instance")


class RoundRobin:
    """Candidates in turn, one counter per role, each from `start` (a proxy worker's index: N workers that each
    see their first request do not all send it to the same instance)."""

    def __init__(self, start: int = 0) -> None:
        self._counters: dict[str, Iterator[int]] = {}
        self._start = start

    def choose(self, role: str, candidates: list[Instance]) -> Instance:
        if not candidates:
            raise no_candidate(role)
        counter = self._counters.setdefault(role, itertools.count(self._start))
        return candidates[next(counter) % len(candidates)]


class LeastLoaded:
    """Fewest legs in flight at this proxy (every worker's); ties go round robin so equal instances share work."""

    def __init__(self, start: int = 0) -> None:
        self._tie_break = RoundRobin(start)

    def choose(self, role: str, candidates: list[Instance]) -> Instance:
        # Each count read once: other workers change the board between two reads, and a second read could leave no
        # candidate at the fewest (an empty list for the tie-break).
        if not candidates:
            raise no_candidate(role)
        loads = [c.in_flight for c in candidates]
        fewest = min(loads)
        return self._tie_break.choose(role, [c for c, load in zip(candidates, loads, strict=True) if load == fewest])


# prefix: the request's own choice is prefix.py's (by cached prefix); least loaded is its tie-break and the
# choice of retries and fallbacks.
POLICIES: dict[str, type[RoundRobin | LeastLoaded]] = {"round_robin": RoundRobin, "least_loaded": LeastLoaded,
                                                        "prefix": LeastLoaded}


class InstancePool:
    """All instances, a background health check, and the routing policy."""

    def __init__(self, instances: list[Instance], policy: str = "round_robin",
                 health_timeout_s: float = HEALTH_TIMEOUT_S, restart_backoff_s: float = RESTART_BACKOFF_S,
                 clock: Callable[[], float] = time.monotonic, board: LoadBoard | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {sorted(POLICIES)}")
        names = [i.name for i in instances]
        if board is not None and board.names != names:
            raise ValueError(f"the load board counts instances {board.names}, the pool has {names}")
        # A proxy worker's board is shared with the other workers (load_board.py); a single proxy's is its own.
        self.board = board or LoadBoard.in_process(names)
        for index, instance in enumerate(instances):
            instance.board, instance.board_index = self.board, index
        self.instances = instances
        self.policy_name = policy
        self.policy = POLICIES[policy](self.board.row)
        self.health_timeout_s = health_timeout_s
        self.restart_backoff_s = restart_backoff_s  # the launcher's wait before it restarts a dead instance
        self.clock = clock
        self.on_stall: Callable[[Instance], None] = lambda instance: None  # metrics count each stall
        self.on_retry: Callable[[str, str], None] = lambda role, reason: None  # ... and each leg sent again
        self._stalled_since: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.been_ready = False  # every role has had a ready instance at once (routes.health's degraded answer)
        self.readied: Counter[str] = Counter()  # per role, how often an instance of it became ready (by a probe)

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
            message = none_ready_message(role, of_role)
            retry_after_s = no_instance_retry_after(of_role, self.restart_backoff_s, self.clock())
            if retry_after_s is None:  # asleep: only a /wake_up ends it
                raise OpenAIError(503, message, code="no_instance")
            raise RetryLater(message, "no_instance", retry_after_s)
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

    def mark_stalled(self, instance: Instance, why: str) -> None:
        if instance.state != "stalled":
            log.warning("%s (%s) stalled: %s; it gets no new requests until it answers again", instance.name,
                        instance.url, why)
            self._stalled_since[instance.name] = time.monotonic()
            self.on_stall(instance)
        instance.state = "stalled"
        instance.detail = why
        instance.stalled.set()

    async def _check(self, client: httpx.AsyncClient, instance: Instance) -> None:
        """Probe the instance's /health and record what it found: its state, and its outage's start or end."""
        engine_id = instance.engine_id
        try:
            await self._probe(client, instance)
        finally:
            restarted = bool(engine_id) and instance.engine_id != engine_id
            instance.outage.observe(instance.state == "ready", self.clock(), restarted,
                                    stalled=instance.state == "stalled")

    async def _probe(self, client: httpx.AsyncClient, instance: Instance) -> None:
        try:
            status, content = await fetch(client, "GET", f"{instance.url}/health", timeout_s=self.health_timeout_s,
                                          max_bytes=HEALTH_MAX_BYTES)
        except AnswerTooLarge as exc:
            instance.health_state = ""
            _not_healthy(instance, f"/health answered with {exc}")
            return
        except (httpx.ReadTimeout, httpx.ConnectTimeout, TimeoutError):
            # Connected (the kernel's backlog accepts for a stopped process) but no answer in time, or not even
            # accepted (that backlog full under client traffic): alive or not, it answers nothing.
            instance.health_state = ""
            self.mark_stalled(instance, f"/health did not answer within {self.health_timeout_s:g}s "
                                        "(proxy.health_timeout_seconds)")
            return
        except httpx.HTTPError as exc:
            instance.health_state = ""  # a sleeping one that was killed is restarting: a wait ends that
            if instance.state != "starting":
                self.mark_down(instance, f"health check failed: {type(exc).__name__}")
            return
        if status != 200:
            refusal = _health_body(content)
            instance.health_state = health_state(refusal)
            _not_healthy(instance, health_refusal(status, refusal))
            return
        instance.health_state = ""
        body = _health_body(content)
        foreign = foreign_answer(instance, body)
        if foreign:
            if instance.detail != foreign:
                log.warning("%s (%s) marked unhealthy, it gets no new requests: %s", instance.name, instance.url,
                            foreign)
            _not_healthy(instance, foreign)
        else:
            self._answered(instance, body)

    def _answered(self, instance: Instance, body: dict[str, object]) -> None:
        """A 200 /health of the instance itself: ready."""
        engine_id = _engine_id(body)
        instance.itl_ms = _itl_ms(body)
        instance.kv_capacity = _kv_capacity(body)
        since = self._stalled_since.pop(instance.name, None)
        if since is not None and instance.state == "stalled":
            log.info("%s (%s) answers again after a stall of %.1fs", instance.name, instance.url,
                     time.monotonic() - since)
        elif instance.state != "ready":
            log.info("%s (%s) is ready (engine_id %s)", instance.name, instance.url, engine_id or "unknown")
        elif instance.engine_id and engine_id != instance.engine_id:
            # Restarted between two checks: it was never seen down, but it is a new engine.
            log.warning("%s (%s) restarted: engine_id %s -> %s", instance.name, instance.url,
                        instance.engine_id, engine_id)
        if instance.state != "ready":
            self.readied[instance.role] += 1
        instance.state, instance.detail, instance.engine_id = "ready", "", engine_id
        instance.stalled.clear()
        self.been_ready = self.been_ready or self.ready()

    def start_monitor(self, client: httpx.AsyncClient) -> None:
        """One probe loop per instance: a stalled one, whose probe takes the whole health timeout, does
        not slow the probes of the others (nor the detection of a second stall)."""
        async def loop(instance: Instance) -> None:
            while True:
                try:
                    await self._check(client, instance)
                except Exception:  # noqa: BLE001 - the monitor must outlive one bad probe
                    log.exception("health check of %s failed", instance.name)
                starting = instance.state == "starting"
                await asyncio.sleep(min(STARTING_INTERVAL_S, HEALTH_INTERVAL_S) if starting else HEALTH_INTERVAL_S)

        self._tasks = [asyncio.create_task(loop(instance)) for instance in self.instances]

    async def stop_monitor(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
