"""Before a dead prefill or decode instance is restarted, its peers forget its engine.

A peer that moved KV with the dead engine loaded its transfer agent, and on CUDA its UCX mapping of the dead
engine's GPU memory keeps that memory allocated as long as the mapping lives (kv_transfer/agent.py: measured,
20 GiB held after the owner died). The instance restarted on that GPU would find its memory taken: a smaller KV
cache, or an out-of-memory error at start. So when the supervisor sees a prefill or decode die, it asks every
other prefill and decode instance of the deployment (`POST /internal/kv/forget_engine`, server/internal.py) to
drop the dead engine's agents, all at once and each within FORGET_TIMEOUT_S, and restarts the instance once
they answered or that time is up. A peer that does not answer is named and skipped: its mapping stays until it
exits. The requests start at the death and run on their own threads; the supervisor's loop waits for them only
at the restart, at most until FORGET_TIMEOUT_S after they began. Each request is bounded as a whole (connect, send
and the whole answer, http/answers.py) and its answer in size, so its thread ends by then too: a peer that answers
a byte a second, or without end, holds no thread or socket past the restart.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import httpx

from pdlaunch.http.answers import fetch
from pdlaunch.server.internal import KV_FORGET_ENGINE_PATH

FORGET_TIMEOUT_S = 5.0
FORGET_MAX_BYTES = 64 << 10  # the answer is a few bytes of JSON: {"engine_id": ..., "forgotten": N}
KV_ROLES = ("prefill", "decode")  # the roles with a KV connector: they load peers' agents
TRANSPORT_TITLES = {"nixl": "NIXL", "mooncake": "Mooncake"}  # connectors with agents (not the storage one)

# Ask one peer (base URL) to forget an engine id within a timeout: how many agents it dropped.
Ask = Callable[[str, str, float], int]


@dataclass(frozen=True)
class Peer:
    name: str
    url: str  # the instance's base URL


def http_ask(headers: dict[str, str]) -> Ask:
    """`Ask` over HTTP with the deployment's internal token (`headers`); raises on any failure, TimeoutError when
    the whole answer did not come within the timeout."""

    def ask(url: str, engine_id: str, timeout: float) -> int:
        try:
            status, body = asyncio.run(_post(url + KV_FORGET_ENGINE_PATH, {"engine_id": engine_id}, headers, timeout))
        except (TimeoutError, httpx.TimeoutException):
            raise TimeoutError(f"did not answer within {timeout:g}s") from None
        text = body.decode(errors="replace")
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {text[:200]}")
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        forgotten = answer.get("forgotten") if isinstance(answer, dict) else None
        if not isinstance(forgotten, int) or isinstance(forgotten, bool) or forgotten < 0:
            raise RuntimeError(f"the answer names no count of agents forgotten: {text[:200]}")
        return forgotten

    return ask


async def _post(url: str, body: dict[str, str], headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    """(status, body) of one POST, connect to the answer's last byte within `timeout` (an event loop of the calling
    thread's own: the deadline cancels a read under way, which a blocking client cannot)."""
    async with httpx.AsyncClient(trust_env=False) as client:
        return await fetch(client, "POST", url, timeout_s=timeout, max_bytes=FORGET_MAX_BYTES, content=json.dumps(
            body).encode(), headers={**headers, "Content-Type": "application/json"})


class PeerForget:
    """One dead engine's forget, asked of its peers on threads from the moment it is made."""

    def __init__(self, dead: str, engine_id: str, peers: list[Peer], ask: Ask, title: str,
                 timeout: float = FORGET_TIMEOUT_S) -> None:
        self.dead, self.engine_id, self.title, self.timeout = dead, engine_id, title, timeout
        self.deadline = time.monotonic() + timeout
        # a thread per peer: all asked at once, so that one that hangs delays no other (a deployment has a few)
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(peers)), thread_name_prefix="pdlaunch-forget")
        self._asked: list[tuple[Peer, Future[int]]] = [(p, self._pool.submit(ask, p.url, engine_id, timeout))
                                                        for p in peers]
        self._pool.shutdown(wait=False)  # its threads end with their requests, each bounded as a whole by `timeout`

    def wait(self) -> list[str]:
        """Wait for the answers until the deadline (real time, from the start); then what to say: each peer that
        dropped agents, each that did not answer in time or failed."""
        wait_futures([f for _, f in self._asked], timeout=max(0.0, self.deadline - time.monotonic()))
        lines = []
        for peer, future in self._asked:
            if not future.done() or isinstance(future.exception(), TimeoutError):  # not yet, or gave up at the deadline
                lines.append(f"{peer.name} did not answer within {self.timeout:g}s when asked to forget {self.dead}'s "
                             f"{self.title} agent (engine {self.engine_id}); a mapping it holds of {self.dead}'s "
                             "memory stays until it exits")
            elif future.exception() is not None:
                lines.append(f"{peer.name} could not be asked to forget {self.dead}'s {self.title} agent (engine "
                             f"{self.engine_id}): {_short(future.exception())}; a mapping it holds of "
                             f"{self.dead}'s memory stays until it exits")
            elif future.result() > 0:  # one agent a TP rank, or per resharding source
                agents = "agent" if future.result() == 1 else "agents"
                lines.append(f"{peer.name} forgot {self.dead}'s {self.title} {agents} ({future.result()})")
        return lines


def _short(exc: BaseException | None) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text[:300]
