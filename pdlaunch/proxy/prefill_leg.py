"""The prefill leg under its own deadline: a stalled prefill is abandoned, never waited on; and what happens when no
prefill can run the leg.

A prefill that is alive but does not answer (SIGSTOPped, hung in a collective, swapped out) keeps the
connection open: without a deadline of its own the leg would wait for the whole request's
(proxy.request_timeout_seconds). Past the prefill deadline, or as soon as the health probe marks the
instance stalled (instances.py), the leg is abandoned and retried once on another ready prefill. A prefill that is
gone (refused the connection, dropped it before answering, or answered 503 shutting_down while it stops: retry.py)
leaves the leg to another ready prefill, once (retry.py on_live_instance).

When the leg can run nowhere (every prefill tried stalled or was gone, none other is ready, or none was ready when the
request came: all restarting, being rolled, asleep), kv_transfer.load_failure_policy decides, whatever the cause:
recompute (the default) sends the client's request to the decode alone, without kv_transfer_params, as a short prompt
goes under proxy.disaggregate_min_tokens: the decode computes the prompt itself, as it does when it cannot load the
KV; logged (WARNING) and counted in pdlaunch_proxy_legs_retried{role="prefill",reason="recompute"}. Under fail the
request fails: a 504 prefill_stalled naming the stall when a prefill stalled, else a 503 no_instance with Retry-After
(when the soonest prefill should be ready again: unready.py) naming the prefills, the policy's field and how to
change it. A 1P1D deployment whose prefill restarts thus keeps answering under recompute, slower (each decode
computes its prompts) but without errors.

The abandoned leg holds no KV for long: closing its connection is a client leaving, so the prefill,
once it runs again, aborts the request or releases what it held for it (server/app.py), and the
KV lease (kv_transfer.kv_lease_seconds) frees anything left. A gone prefill holds none past its end: one that
refused the connection never got the leg, one that dropped it died or saw its client leave (as an abandoned leg),
and one that answered shutting_down stops, its KV with it; the lease frees what a prefill that lives on still holds.

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
from dataclasses import dataclass
from typing import TypeVar

from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.retry_later import RetryLater
from pdlaunch.proxy.bodies import Body, JsonObject
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.retry import gone, on_live_instance
from pdlaunch.proxy.unready import no_instance_retry_after
from pdlaunch.proxy.upstream import Proxy

log = logging.getLogger("pdlaunch.proxy")

FLOOR_S = 5.0  # a short prompt on a loaded instance, and the scheduling of a batch that arrives at once
SLACK = 4.0  # how much slower than the average a prefill may be before it counts as stalled
COLD_S = 60.0  # before any prefill leg answered: model warm-up, first CUDA graphs and kernels
ALPHA = 0.2  # weight of the newest leg in the average
NO_INSTANCE = "no_instance"  # InstancePool.pick's code: no instance of the role is ready
UNDER_FAIL = ("kv_transfer.load_failure_policy is fail, so the decode does not compute the prompt itself; set it to "
              "recompute (the default) to have the decode compute prompts while no prefill can")
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


@dataclass(frozen=True)
class Recompute:
    """No prefill answered the leg, and the decode computes the prompt itself (policy recompute): `why`, for the
    request's log line."""

    why: str  # "stalled", "gone", "none ready"


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
        self.without_prefill = 0  # requests the decode computed since no prefill was ready (said once: none_ready)
        self._readied = 0  # pool.readied["prefill"] when that outage was said: a prefill ready since ends it

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
                  request_deadline: float, chars: int) -> tuple[Instance, JsonObject] | Recompute:
        """(prefill that answered, its answer), or Recompute: no prefill answered (stalled, or gone with no other
        ready) and the decode is to compute the prompt itself. Under policy fail raises a 504 OpenAIError naming the
        stall, or, with no stall, a 503 no_instance naming the prefill that was gone (module doc).
        The leg's X-Request-Id (headers) is one no other request uses (prompt_request._leg_id): cancelled (the
        client left), the leg asks every prefill it was sent to, a replacement for one that was gone
        included, to release what it holds for that id: one that answered as the client left holds KV
        for params nobody read (it saw no disconnect: its answer was already sent). In front of foreign
        instances the releaser is off and the id may be the client's own."""
        if self.without_prefill:
            log.info("%s is ready again: PD requests have a prefill leg again (%d computed by decodes meanwhile)",
                     first.name, self.without_prefill)
            self.without_prefill = 0
        sent: list[Instance] = []
        try:
            return await self._run(first, path, leg, headers, request_deadline, chars, sent)
        except asyncio.CancelledError:
            for instance in sent:
                self.proxy.kv.release_client_soon(instance, headers["X-Request-Id"])
            raise

    async def _run(self, first: Instance, path: str, leg: JsonObject, headers: dict[str, str],
                   request_deadline: float, chars: int,
                   sent: list[Instance]) -> tuple[Instance, JsonObject] | Recompute:
        tried: list[Instance] = []  # the candidates chosen here; on_live_instance may send to one more each
        failures: list[str] = []
        stalled = False
        candidate: Instance | None = first
        while candidate is not None and len(tried) < 2:
            budget = min(self.deadline.seconds_for(chars), self.proxy.remaining(request_deadline))
            started = time.monotonic()

            async def call(instance: Instance, budget: float = budget) -> JsonObject:
                sent.append(instance)
                return await self._leg(instance, path, leg, headers, request_deadline, budget)

            tried.append(candidate)
            before = len(sent)
            try:
                prefill, answer = await on_live_instance(self.pool, "prefill", candidate, call)
            except PrefillStalled as stall:
                stalled = True
                failures.append(str(stall))
                log.warning("request %s: %s; abandoned (its KV, if any, is released when it runs again or "
                            "by the lease)", headers.get("X-Request-Id", "?"), stall)
                others = [i for i in self.pool.instances
                          if i.role == "prefill" and i.state == "ready" and i not in sent]
                candidate = self.pool.policy.choose("prefill", others) if others and len(tried) < 2 else None
                if candidate is not None:
                    self.pool.on_retry("prefill", "stalled")
                continue
            except OpenAIError as exc:
                if not gone(exc):
                    raise
                # on_live_instance found no other ready prefill, or the other was gone too: none is left to try. Each
                # one it sent to is named (the error is the last one's): the first was gone as well.
                names = [i.name for i in sent[before:]]
                failures.append(f"{' and '.join(names)} {'is' if len(names) == 1 else 'are'} gone "
                                f"({'the last: ' if len(names) > 1 else ''}{exc.message}), and no other prefill "
                                "instance is ready")
                break
            self.deadline.observe(chars, time.monotonic() - started)
            return prefill, answer
        return self._nowhere(failures, stalled, headers.get("X-Request-Id", "?"), request_deadline)

    def _nowhere(self, failures: list[str], stalled: bool, request_id: str,
                 request_deadline: float) -> Recompute:
        """No prefill answered the leg: Recompute under policy recompute (a stall's only while the request has
        time left), else the error that says why (module doc)."""
        what = "; ".join(failures)
        if self.recompute and (not stalled or request_deadline > time.monotonic()):
            self.pool.on_retry("prefill", "recompute")
            log.warning("request %s: %s; the decode computes the prompt itself "
                        "(kv_transfer.load_failure_policy: recompute)", request_id, what)
            return Recompute("stalled" if stalled else "gone")
        if stalled:
            why = "kv_transfer.load_failure_policy: fail" if not self.recompute else "proxy.request_timeout_seconds"
            raise OpenAIError(504, f"prefill stalled: {what} (proxy.prefill_timeout_seconds), and no other prefill "
                                   f"instance answered in time ({why})", code="prefill_stalled")
        raise self._unavailable(f"the prefill leg could not run: {what}")

    def none_ready(self, exc: OpenAIError, request_id: str) -> Recompute:
        """No prefill instance was ready for a request (`exc`: InstancePool.pick's 503 no_instance): Recompute under
        policy recompute, else that 503, its Retry-After kept, saying what the policy does and how to change it."""
        if not self.recompute:
            message = f"{exc.message}; {UNDER_FAIL}"
            if isinstance(exc, RetryLater):
                raise RetryLater(message, NO_INSTANCE, exc.retry_after_s) from None
            raise OpenAIError(503, message, code=NO_INSTANCE) from None
        self.pool.on_retry("prefill", "recompute")
        readied = self.pool.readied["prefill"]
        if self.without_prefill and readied != self._readied:
            # a prefill was ready between two outages with no PD request to end the first (run's line): a new one
            log.info("a prefill instance was ready again meanwhile (%d requests computed by decodes in the outage "
                     "before)", self.without_prefill)
            self.without_prefill = 0
        self._readied = readied
        states = ", ".join(f"{i.name} {i.state}" for i in self.pool.instances if i.role == "prefill")
        # Said once, then at DEBUG until a prefill is ready again: a prefill's restart would log every request.
        log.log(logging.DEBUG if self.without_prefill else logging.WARNING,
                "request %s: no prefill instance is ready (%s); the decode computes the prompt itself "
                "(kv_transfer.load_failure_policy: recompute), as it does for every request until a prefill is ready "
                "(counted in pdlaunch_proxy_legs_retried{role=\"prefill\",reason=\"recompute\"})", request_id,
                states or "none configured")
        self.without_prefill += 1
        return Recompute("none ready")

    def _unavailable(self, what: str) -> OpenAIError:
        """The 503 no_instance of a leg that no prefill could run under policy fail: Retry-After when the soonest
        prefill should be ready again (none while every one is asleep: a wait does not end that)."""
        prefills = [i for i in self.pool.instances if i.role == "prefill"]
        message = f"{what}; {UNDER_FAIL}, or retry later (GET /instances shows each instance's state)"
        retry_after_s = no_instance_retry_after(prefills, self.pool.restart_backoff_s, self.pool.clock())
        if retry_after_s is None:
            return OpenAIError(503, message, code=NO_INSTANCE)
        return RetryLater(message, NO_INSTANCE, retry_after_s)
