"""One prompt's request through the proxy: the instances chosen for it (prefix.py), its prefill leg unless it
runs colocated or on the decode alone (disaggregate.py), then its decode leg (decode_leg.py); the request's
log line names every leg.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi.responses import Response

from pdlaunch.http.disconnect import CLIENT_CLOSED, ClientDisconnected
from pdlaunch.http.errors import OpenAIError
from pdlaunch.proxy.bodies import JsonObject
from pdlaunch.proxy.call import Call, suffixed
from pdlaunch.proxy.decode_leg import DecodeLeg
from pdlaunch.proxy.disaggregate import DECODE_BUSY, ON_DECODE, PD, SPILLED
from pdlaunch.proxy.instances import Instance
from pdlaunch.proxy.prefill_leg import NO_INSTANCE, Recompute, prompt_chars
from pdlaunch.proxy.prefix import Choice, PromptBlocks, queued
from pdlaunch.proxy.translate import (
    client_limit_error,
    continues_from_first_token,
    decode_body,
    ended_by_first_token,
    kv_params_of,
    prefill_body,
)

log = logging.getLogger("pdlaunch.proxy")


@dataclass
class PromptRequest(DecodeLeg):
    """One prompt's request: its prefill leg (unless colocated or decode only), then its decode leg."""

    call: Call
    body: JsonObject
    request_id: str
    headers: dict[str, str]
    legs: list[str] = field(default_factory=list)  # instances that served it, for the DEBUG line
    held: tuple[Instance, JsonObject] | None = None  # a prefill's KV waiting for our decode leg
    prefill_answer: JsonObject | None = None
    migrated: bool = False  # the decode leg moved to another decode, which computed the prompt itself
    outcome: str = "error"
    unqueue: Callable[[], None] = lambda: None  # the decode leg's queued tokens end (prefix.py)
    unqueue_prefill: Callable[[], None] = lambda: None  # ... the prefill leg's
    ended: Callable[[], None] = lambda: None  # the request may ask for no more releases (release.py `opened`)

    def _leg_id(self) -> str:
        """The prefill leg's X-Request-Id: the request's own when the proxy made it, else, in front of
        this deployment's instances, the client's with a suffix of ours (a client may reuse its id; the
        leg's must be unique, since a client that leaves during the leg gets the KV held under it
        released by that id). It stays within the instances' X-Request-Id limit, so the client's id is
        cut to fit (logs still find it by its start). In front of foreign instances (no deployment
        secret: no release either) both legs carry the client's id, as vLLM's proxies send them."""
        if self.call.made_request_id or not self.call.state.proxy.kv.enabled:
            return self.request_id
        return suffixed(self.request_id, f"-leg{uuid.uuid4().hex[:12]}")

    async def serve(self) -> Response:
        state, started = self.call.state, time.monotonic()
        self.ended = state.proxy.kv.opened()
        try:
            # Token ids only where they decide something: prefix routing, or disaggregation by uncached tokens.
            wanted = state.router.by_prefix or state.disaggregation.min_tokens is not None
            prompt = await state.router.prompt(self.body, self.call.chat) if wanted else None
            if state.pool.colocated:
                return await self._decode(self._choose("colocated", prompt).instance, self.body)
            return await self._decode(*await self._prefill(prompt))
        except ClientDisconnected:
            self.release_held()
            self.outcome = "client closed"
            return Response(status_code=CLIENT_CLOSED)
        except OpenAIError as exc:
            self.release_held()  # the decode refused the request, failed, or could not be reached
            self.outcome = f"error {exc.status}"
            raise
        except asyncio.CancelledError:
            self.release_held()  # another prompt of the same request failed
            self.outcome = "cancelled"
            raise
        finally:
            if self.outcome != "streaming":  # a stream's ends when it closes
                self.unqueue()
                self.ended()
            # the time tells where a slow request spent it: a stream's is until its decode answered (the decode's
            # own line has the whole stream's), so a slow prefill leg or queue shows here
            log.debug("request %s %s via %s: %s %s %.3fs", self.request_id, self.call.path,
                      " -> ".join(self.legs) or "no instance", self.outcome,
                      "after" if self.outcome == "streaming" else "in", time.monotonic() - started)

    def _choose(self, role: str, prompt: PromptBlocks | None) -> Choice:
        """An instance of `role` for the prompt (prefix.py); its uncached tokens count as queued there until
        `unqueue` runs (the decode leg's) or the prefill leg answers."""
        state = self.call.state
        choice = state.router.choose(role, prompt)
        if prompt is not None:
            if state.router.by_prefix:  # what the score weighed, for the request's log line
                self.legs.append(f"prefix {choice.instance.name} ({choice.matched_tokens} of {len(prompt.token_ids)} "
                                 f"prompt tokens cached, {queued(choice.instance)} queued)")
            if choice.by_prefix:
                state.proxy.metrics.prefix_routed.labels(role).inc()
            state.proxy.metrics.prefix_matched_tokens.labels(role).inc(choice.matched_tokens)
            unqueue = state.router.enqueue(choice.instance, len(prompt.token_ids) - choice.matched_tokens)
            if role != "prefill":
                self.unqueue = unqueue
            else:
                self.unqueue_prefill = unqueue
        return choice

    async def _prefill(self, prompt: PromptBlocks | None) -> tuple[Instance, JsonObject]:
        """(the decode, its leg): the prefill leg run first unless the request runs on the decode alone."""
        state, body, chat = self.call.state, self.body, self.call.chat
        # The decode is picked first: no prefill work (and no held KV) when no decode instance is up.
        decode = self._choose("decode", prompt)
        target, decision = decode.instance, PD
        disaggregation = state.disaggregation
        if prompt is not None and disaggregation.min_tokens is not None:
            uncached = len(prompt.token_ids) - decode.matched_tokens
            queued = state.router.least_queued("prefill")
            in_flight = target.in_flight
            decision = disaggregation.decision(uncached, queued, target, target.itl_ms, in_flight)
            state.proxy.metrics.disaggregation.labels(decision).inc()
            if decision == SPILLED:  # counted against the decode's cap until the request ends
                self.unqueue = _both(self.unqueue, disaggregation.spill(target, uncached))
            self.legs.append(f"{decision} ({len(prompt.token_ids)} prompt tokens, {decode.matched_tokens} cached on "
                             f"{target.name}, {uncached} uncached; disaggregate_min_tokens "
                             f"{disaggregation.min_tokens}"
                             + (f"; prefill queue {queued} tokens, disaggregate_max_queue_tokens "
                                f"{disaggregation.max_queue_tokens}" if decision == SPILLED else "")
                             + (f"; {target.name} {_busy(target.itl_ms, in_flight)}, "
                                f"disaggregate_max_itl_ms {disaggregation.max_itl_ms:g}"
                                if decision == DECODE_BUSY else "") + ")")
        first_token = continues_from_first_token(body)
        answered = None if decision in ON_DECODE else await self._prefill_leg(prompt, target, first_token)
        if not isinstance(answered, tuple):  # a short prompt, or no prefill could answer: the decode computes it
            if answered is not None:
                self.legs.append(f"no prefill ({answered.why})")
            return target, {k: v for k, v in body.items() if k != "kv_transfer_params"}
        prefill, self.prefill_answer = answered
        self.legs.append(prefill.name)
        self.held = (prefill, kv_params_of(prefill, self.prefill_answer))
        leg = decode_body(body, self.held[1])
        if first_token and ended_by_first_token(body, chat, self.prefill_answer):
            # Its one token is the whole answer: the decode ends at admission without loading, so
            # the prefill's KV goes back now rather than at the end of its lease. The decode leg
            # still runs: it answers the request, and applies the request's own limits where the
            # prefill could not (a foreign prefill, or a decode whose KV cache it was not told: decode_limits.py).
            self.release_held()
            self.held = None
        return target, leg

    async def _prefill_leg(self, prompt: PromptBlocks | None, decode: Instance,
                           first_token: bool) -> tuple[Instance, JsonObject] | Recompute:
        """(the prefill that answered, its answer), or Recompute: no prefill could answer, none was ready included,
        and the decode computes the prompt (kv_transfer.load_failure_policy recompute; under fail the error that
        says why: prefill_leg.py)."""
        state, body, chat = self.call.state, self.body, self.call.chat
        leg = prefill_body(body, chat, first_token, decode_limits=state.proxy.kv.enabled,
                           decode_kv_cache=decode.kv_capacity)
        started = time.monotonic()
        try:
            prefill = self._choose("prefill", prompt).instance
        except OpenAIError as exc:
            if exc.code != NO_INSTANCE:
                raise
            return state.prefill_legs.none_ready(exc, self.request_id)
        leg_id = self._leg_id()

        async def release(done: tuple[Instance, JsonObject] | Recompute) -> None:
            """An answer that came in as the request was cancelled: what the prefill holds goes back."""
            if isinstance(done, tuple):
                state.proxy.kv.release_client_soon(done[0], leg_id)

        try:
            answered = await self.call.watch.run(state.prefill_legs.run(
                prefill, self.call.path, leg, {**self.headers, "X-Request-Id": leg_id},
                self.call.deadline, prompt_chars(body)), discard=release)
        except OpenAIError as exc:
            raise client_limit_error(exc, body, chat) from None
        finally:
            self.unqueue_prefill()
        if isinstance(answered, tuple):
            state.proxy.metrics.prefill_seconds.observe(time.monotonic() - started)
        return answered


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    """One callable that runs `first`, then `second` (two releases that end together)."""

    def run() -> None:
        first()
        second()

    return run


def _busy(itl_ms: float | None, in_flight: int) -> str:
    """Why a decode counted as without TPOT headroom (disaggregate.py), for the request's log line."""
    if not itl_ms:  # 0.0 (never None: such a decode is never busy)
        return f"has {in_flight} requests in flight that its last /health (idle) predates"
    return f"streams at {itl_ms:.2f} ms a token"
