"""The prefill leg under its own deadline: a stalled prefill is abandoned, never waited on.

A prefill that is alive but does not answer (SIGSTOPped, hung in a collective, swapped out) keeps the
connection open: without a deadline of its own the leg would wait for the whole request's
(proxy.request_timeout_seconds). Past the prefill deadline, or as soon as the health probe marks the
instance stalled (instances.py), the leg is abandoned, retried once on
another ready prefill, and when that is not possible either the prompt is computed by the decode
(kv_transfer.load_failure_policy: recompute, as a decode does when it cannot load the KV) or the
request fails with a 504 naming the stall (policy fail).

The abandoned leg holds no KV for long: closing its connection is a client leaving, so the prefill,
once it runs again, aborts the request or releases what it held for it (server/app.py), and the
KV lease (kv_transfer.kv_lease_seconds) frees anything left.

The deadline (PrefillDeadline): proxy.prefill_timeout_seconds when set; else derived from the
prompt's length and the measured prefill speed:

    deadline = FLOOR_S + SLACK * prompt_chars * seconds_per_char

where seconds_per_char is an exponential moving average (weight ALPHA) over the prefill legs that
answered, each leg's time (queueing at the instance included) over its prompt's characters; before
any leg answered, COLD_S. Never past the request's own deadline. Characters, not tokens: the proxy
does not tokenize, and it measures in the unit it predicts in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TypeVar

from pdlaunch.http.errors import OpenAIError
from pdlaunch.proxy.bodies import Body, JsonObject
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.retry import on_live_instance
from pdlaunch.proxy.upstream import Proxy

log = logging.getLogger("pdlaunch.proxy")

FLOOR_S = 5.0  # a short prompt on a loaded instance, and the scheduling of a batch that arrives at once
SLACK = 4.0  # how much slower than the average a prefill may be before it counts as stalled
COLD_S = 60.0  # before any prefill leg answered: model warm-up, first CUDA graphs and kernels
ALPHA = 0.2  # weight of the newest leg in the average
T = TypeVar("T")


def prompt_chars(body: Body) -> int:
    """The prompt's length in characters: the `prompt` string (or its JSON: token ids, lists) or the
    chat `messages` as JSON."""
    prompt = body.get("messages") if "messages" in body else body.get("prompt")
    if isinstance(prompt, str):
        return max(1, len(prompt))
    return max(1, len(json.dumps(prompt, separators=(",", ":"), ensure_ascii=False)))


class PrefillDeadline:
    """How long a prefill leg may take (the module docstring's rule)."""

    def __init__(self, fixed_s: float | None = None) -> None:
        self.fixed_s = fixed_s
        self.seconds_per_char: float | None = None  # measured; None until a leg answered

    def observe(self, chars: int, seconds: float) -> None:
        """A prefill leg of `chars` prompt characters answered after `seconds`."""
        sample = max(seconds, 0.0) / max(chars, 1)
        self.seconds_per_char = sample if self.seconds_per_char is None else \
            (1 - ALPHA) * self.seconds_per_char + ALPHA * sample

    def seconds_for(self, chars: int) -> float:
        if self.fixed_s is not None:
            return self.fixed_s
        if self.seconds_per_char is None:
            return COLD_S
        return FLOOR_S + SLACK * chars * self.seconds_per_char


class PrefillStalled(Exception):
    """The prefill did not answer within the leg's deadline."""

    def __init__(self, instance: Instance, seconds: float, marked: str = "") -> None:
        self.instance = instance
        self.seconds = seconds
        super().__init__(f"{instance.name} was marked stalled ({marked}) {seconds:.1f}s into the prefill leg"
                         if marked else f"{instance.name} did not answer the prefill leg within {seconds:.1f}s")


async def _cancel(task: asyncio.Future[T]) -> None:
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # its lease (in-flight count) ends now


class PrefillLegs:
    """Runs the prefill leg of PD requests: under its deadline, once more elsewhere, then the fallback."""

    def __init__(self, proxy: Proxy, deadline: PrefillDeadline, recompute: bool) -> None:
        self.proxy = proxy
        self.pool: InstancePool = proxy.pool
        self.deadline = deadline
        self.recompute = recompute  # kv_transfer.load_failure_policy == "recompute"

    async def _leg(self, instance: Instance, path: str, leg: JsonObject, headers: dict[str, str],
                   request_deadline: float, budget: float) -> JsonObject:
        """The leg on `instance`, abandoned at `budget` seconds, or earlier when its health probe marks it
        stalled (InstancePool.mark_stalled)."""
        started = time.monotonic()
        answer = asyncio.ensure_future(self.proxy.post_json(instance, path, leg, headers, request_deadline))
        marked = asyncio.ensure_future(instance.stalled.wait())
        try:
            await asyncio.wait({answer, marked}, timeout=budget, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel(marked)
            if not answer.done():
                await _cancel(answer)
        if answer.done() and not answer.cancelled():
            return answer.result()
        if instance.stalled.is_set():
            raise PrefillStalled(instance, time.monotonic() - started, instance.detail)
        raise PrefillStalled(instance, budget)

    async def run(self, first: Instance, path: str, leg: JsonObject, headers: dict[str, str],
                  request_deadline: float, chars: int) -> tuple[Instance, JsonObject] | None:
        """(prefill that answered, its answer), or None: no prefill answered in time and the decode is to
        compute the prompt itself. Raises a 504 OpenAIError naming the stall under policy fail.
        The leg's X-Request-Id (headers) is one no other request uses (prompt_request._leg_id): cancelled (the
        client left), the leg asks every prefill it was sent to, a replacement for one that was gone
        included, to release what it holds for that id: one that answered as the client left holds KV
        for params nobody read (it saw no disconnect: its answer was already sent). In front of foreign
        instances the releaser is off and the id may be the client's own."""
        sent: list[Instance] = []
        try:
            return await self._run(first, path, leg, headers, request_deadline, chars, sent)
        except asyncio.CancelledError:
            for instance in sent:
                self.proxy.kv.release_client_soon(instance, headers["X-Request-Id"])
            raise

    async def _run(self, first: Instance, path: str, leg: JsonObject, headers: dict[str, str],
                   request_deadline: float, chars: int, sent: list[Instance]) -> tuple[Instance, JsonObject] | None:
        tried: list[Instance] = []  # the candidates chosen here; on_live_instance may send to one more each
        stalls: list[PrefillStalled] = []
        candidate: Instance | None = first
        while candidate is not None and len(tried) < 2:
            budget = min(self.deadline.seconds_for(chars), self.proxy.remaining(request_deadline))
            started = time.monotonic()

            async def call(instance: Instance, budget: float = budget) -> JsonObject:
                sent.append(instance)
                return await self._leg(instance, path, leg, headers, request_deadline, budget)

            tried.append(candidate)
            try:
                prefill, answer = await on_live_instance(self.pool, "prefill", candidate, call)
            except PrefillStalled as stall:
                stalls.append(stall)
                log.warning("request %s: %s; abandoned (its KV, if any, is released when it runs again or "
                            "by the lease)", headers.get("X-Request-Id", "?"), stall)
                others = [i for i in self.pool.instances
                          if i.role == "prefill" and i.state == "ready" and i not in tried]
                candidate = self.pool.policy.choose("prefill", others) if others and len(tried) < 2 else None
                if candidate is not None:
                    self.pool.on_retry("prefill", "stalled")
                continue
            self.deadline.observe(chars, time.monotonic() - started)
            return prefill, answer
        what = "; ".join(str(s) for s in stalls)
        if self.recompute and request_deadline > time.monotonic():
            self.pool.on_retry("prefill", "recompute")
            log.warning("request %s: %s; the decode computes the prompt itself "
                        "(kv_transfer.load_failure_policy: recompute)", headers.get("X-Request-Id", "?"), what)
            return None
        why = "kv_transfer.load_failure_policy: fail" if not self.recompute else "proxy.request_timeout_seconds"
        raise OpenAIError(504, f"prefill stalled: {what} (proxy.prefill_timeout_seconds), and no other prefill "
                               f"instance answered in time ({why})", code="prefill_stalled")
