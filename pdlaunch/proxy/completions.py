"""`/v1/completions` and `/v1/chat/completions` at the proxy: prefill leg, then decode leg streamed through
(docs/ARCHITECTURE.md "Request flow").

The prefill leg asks for its sampled token in the signed answer (when the request allows it:
translate.continues_from_first_token); the decode hands that token to the client at admission and
continues from it (engine/first_token.py), so the client's first token does not wait for the KV
transfer. A token that ends the request (or max_tokens 1) ends it at the prefill's answer.

The calls to instances (deadlines, errors, relaying a stream) live in upstream.py; a leg refused by a
dead instance is retried once on another (retry.py), a prefill leg that outlives its deadline (a stalled
prefill) likewise, else the decode computes the prompt (prefill_leg.py); a decode that dies or stalls
mid-request is replaced (migrate.py). A list of prompts in /v1/completions becomes one PD request per
prompt, merged (prompt_lists.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pdlaunch.http.disconnect import CLIENT_CLOSED, ClientDisconnected, DisconnectWatch
from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.limits import MAX_REQUEST_ID_CHARS, PARSE_INLINE_BYTES, client_request_id
from pdlaunch.http.sse import ClosingStreamingResponse, sse_event
from pdlaunch.proxy.bodies import JsonObject, int_of
from pdlaunch.proxy.continuation import not_migratable
from pdlaunch.proxy.disaggregate import DECODE_BUSY, ON_DECODE, PD, SPILLED
from pdlaunch.proxy.instances import Instance
from pdlaunch.proxy.prefill_leg import prompt_chars
from pdlaunch.proxy.prefix import Choice, PromptBlocks
from pdlaunch.proxy.prompt_lists import MergedStream, gather_legs, merge_answers, split_prompts
from pdlaunch.proxy.retry import on_live_instance
from pdlaunch.proxy.state import ProxyState, state_of
from pdlaunch.proxy.translate import (
    client_limit_error,
    continues_from_first_token,
    decode_body,
    ended_by_first_token,
    kv_params_of,
    parse_client_body,
    prefill_body,
    prefill_cached_tokens,
    refuse_in_pd,
    with_cached_tokens,
    with_prompt_logprobs,
)
from pdlaunch.proxy.upstream import Upstream

log = logging.getLogger("pdlaunch.proxy")


async def completions(request: Request) -> Response:
    return await _route(request, "/v1/completions", chat=False)


async def chat_completions(request: Request) -> Response:
    return await _route(request, "/v1/chat/completions", chat=True)


@dataclass
class _Call:
    """What every leg of one client request shares."""

    state: ProxyState
    path: str
    chat: bool
    deadline: float
    watch: DisconnectWatch
    made_request_id: bool  # the proxy made the X-Request-Id (the client sent none): no other request has it


async def _route(request: Request, path: str, chat: bool) -> Response:
    state = state_of(request)
    raw = await request.body()
    body = parse_client_body(raw, chat) if len(raw) <= PARSE_INLINE_BYTES else \
        await asyncio.to_thread(parse_client_body, raw, chat)  # the event loop serves every stream
    request_id = client_request_id(request.headers.get("x-request-id"), f"pd-{uuid.uuid4().hex}")
    headers = state.forwarded_headers(request, request_id)
    with DisconnectWatch(request) as watch:
        call = _Call(state, path, chat, time.monotonic() + state.proxy.request_timeout_s, watch,
                     made_request_id=not request.headers.get("x-request-id"))
        if not state.pool.colocated:
            refuse_in_pd(body, chat)
        parts = None if chat or state.pool.colocated else split_prompts(body)
        if parts is None:
            return await _PromptRequest(call, body, request_id, headers).serve()
        return await _serve_prompts(call, parts, body, request_id, headers)


async def _serve_prompts(call: _Call, parts: list[JsonObject], body: JsonObject, request_id: str,
                         headers: dict[str, str]) -> Response:
    """A list of prompts in PD: one PD request per prompt, concurrently, merged (prompt_lists.py)."""
    n, response_id = int_of(body.get("n")) or 1, f"cmpl-{request_id}"
    ids = [_suffixed(request_id, f"-{p}") for p in range(len(parts))]
    calls = [_PromptRequest(call, part, ids[p], {**headers, "X-Request-Id": ids[p]}).serve()
             for p, part in enumerate(parts)]
    answers = await gather_legs(calls, _close_streams)
    if any(a.status_code == CLIENT_CLOSED for a in answers):
        await _close_streams(answers)
        return Response(status_code=CLIENT_CLOSED)
    if body.get("stream"):
        streams = [a for a in answers if isinstance(a, ClosingStreamingResponse)]
        if len(streams) != len(answers):
            await _close_streams(answers)
            raise OpenAIError(502, "an instance answered a streamed prompt without a stream",
                              code="instance_failed")
        merged = MergedStream(streams, n, response_id)
        return ClosingStreamingResponse(merged.events(), on_close=merged.close,
                                        headers={"X-Request-Id": request_id, "Cache-Control": "no-cache"})
    return JSONResponse(merge_answers([json.loads(bytes(a.body)) for a in answers], n, response_id),
                        headers={"X-Request-Id": request_id})


def _suffixed(request_id: str, suffix: str) -> str:
    """`request_id` with `suffix`, within the instances' X-Request-Id limit: the client's id (at most that
    long) is cut to fit, else the instances refuse the leg (logs still find it by its start)."""
    return request_id[:MAX_REQUEST_ID_CHARS - len(suffix)] + suffix


async def _close_streams(answers: list[Response]) -> None:
    for answer in answers:
        if isinstance(answer, ClosingStreamingResponse):
            await answer.close()


@dataclass
class _PromptRequest:
    """One prompt's request: its prefill leg (unless colocated or decode only), then its decode leg."""

    call: _Call
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

    def _leg_id(self) -> str:
        """The prefill leg's X-Request-Id: the request's own when the proxy made it, else, in front of
        this deployment's instances, the client's with a suffix of ours (a client may reuse its id; the
        leg's must be unique, since a client that leaves during the leg gets the KV held under it
        released by that id). It stays within the instances' X-Request-Id limit, so the client's id is
        cut to fit (logs still find it by its start). In front of foreign instances (no deployment
        secret: no release either) both legs carry the client's id, as vLLM's proxies send them."""
        if self.call.made_request_id or not self.call.state.proxy.kv.enabled:
            return self.request_id
        return _suffixed(self.request_id, f"-leg{uuid.uuid4().hex[:12]}")

    def release_held(self) -> None:
        if self.held is not None:
            self.call.state.proxy.kv.release_soon(*self.held)
            self.held = None  # once: a migration and the request's end may both ask

    def moved(self) -> None:
        """The decode leg moves to another decode (migrate.py): the prefill's held KV goes back, and its prompt
        tokens stop counting as queued (or spilled) on the decode it leaves (a restarted decode would otherwise
        look busy with requests that run elsewhere until they end)."""
        self.release_held()
        self.unqueue()
        self.migrated = True

    def _reported(self, answer: JsonObject) -> JsonObject:
        """The decode's answer (or a stream event of it with usage) with the cached tokens this request reused: the
        prefill leg's instance's, unless the decode computed the prompt itself (with_cached_tokens). Without a
        prefill leg, or after a migration (the new decode computed the prompt), the decode's own count stands."""
        if self.prefill_answer is None or self.migrated:
            return answer
        return with_cached_tokens(answer, prefill_cached_tokens(self.prefill_answer))

    def _with_reported_usage(self, chunk: bytes) -> bytes:
        """A relayed stream event (one `data: ...` event), with the reported cached tokens when it carries usage."""
        if self.prefill_answer is None or b'"usage"' not in chunk or not chunk.startswith(b"data: {"):
            return chunk  # a key in the JSON, never inside a string (its quotes are escaped there)
        try:
            event = json.loads(chunk.removeprefix(b"data: "))
        except ValueError:
            return chunk
        if not isinstance(event, dict):
            return chunk
        reported = self._reported(event)
        return chunk if reported is event else sse_event(reported)

    async def serve(self) -> Response:
        state = self.call.state
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
            log.debug("request %s %s via %s: %s", self.request_id, self.call.path,
                      " -> ".join(self.legs) or "no instance", self.outcome)

    def _choose(self, role: str, prompt: PromptBlocks | None) -> Choice:
        """An instance of `role` for the prompt (prefix.py); its uncached tokens count as queued there until
        `unqueue` runs (the decode leg's) or the prefill leg answers."""
        state = self.call.state
        choice = state.router.choose(role, prompt)
        if prompt is not None:
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
            decision = disaggregation.decision(uncached, queued, target.name, target.itl_ms, in_flight)
            state.proxy.metrics.disaggregation.labels(decision).inc()
            if decision == SPILLED:  # counted against the decode's cap until the request ends
                self.unqueue = _both(self.unqueue, disaggregation.spill(target.name, uncached))
            self.legs.append(f"{decision} ({len(prompt.token_ids)} prompt tokens, {decode.matched_tokens} cached on "
                             f"{target.name}, {uncached} uncached; disaggregate_min_tokens "
                             f"{disaggregation.min_tokens}"
                             + (f"; prefill queue {queued} tokens, disaggregate_max_queue_tokens "
                                f"{disaggregation.max_queue_tokens}" if decision == SPILLED else "")
                             + (f"; {target.name} {_busy(target.itl_ms, in_flight)}, "
                                f"disaggregate_max_itl_ms {disaggregation.max_itl_ms:g}"
                                if decision == DECODE_BUSY else "") + ")")
        first_token = continues_from_first_token(body)
        answered = None
        if decision not in ON_DECODE:
            leg = prefill_body(body, chat, first_token)
            started = time.monotonic()
            prefill = self._choose("prefill", prompt).instance
            leg_id = self._leg_id()

            async def release(done: tuple[Instance, JsonObject] | None) -> None:
                """An answer that came in as the request was cancelled: what the prefill holds goes back."""
                if done is not None:
                    state.proxy.kv.release_client_soon(done[0], leg_id)

            try:
                answered = await self.call.watch.run(state.prefill_legs.run(
                    prefill, self.call.path, leg, {**self.headers, "X-Request-Id": leg_id},
                    self.call.deadline, prompt_chars(body)), discard=release)
            except OpenAIError as exc:
                raise client_limit_error(exc, body, chat) from None
            finally:
                self.unqueue_prefill()
        if answered is None:  # a short prompt, or no prefill answered in time: the decode computes it
            if decision not in ON_DECODE:
                self.legs.append("no prefill (stalled)")
            return target, {k: v for k, v in body.items() if k != "kv_transfer_params"}
        prefill, self.prefill_answer = answered
        self.legs.append(prefill.name)
        state.proxy.metrics.prefill_seconds.observe(time.monotonic() - started)
        self.held = (prefill, kv_params_of(prefill, self.prefill_answer))
        leg = decode_body(body, self.held[1])
        if first_token and ended_by_first_token(body, chat, self.prefill_answer):
            # Its one token is the whole answer: the decode ends at admission without loading, so
            # the prefill's KV goes back now rather than at the end of its lease. The decode leg
            # still runs: it applies the request's own limits (prompt + max_tokens against
            # max_model_len) that the prefill's one-token leg never saw, as colocated would.
            self.release_held()
            self.held = None
        return target, leg

    async def _decode(self, target: Instance, leg: JsonObject) -> Response:
        """The decode leg (or the colocated instance's): streamed through, or its whole answer."""
        state, call, body = self.call.state, self.call, self.body
        if body.get("stream"):
            migrating = state.migrations.streams(body, call.chat)
            if migrating:  # the ids to continue from when this decode fails (migrate.py)
                leg = {**leg, "return_token_ids": True}
            if state.migrations.limit > 0:
                # Whatever the request's shape, a stream of which the client has nothing yet moves whole off a
                # decode that stalls before its headers; only continuing one mid-way needs `migrating`.
                upstream, migrated = await call.watch.run(state.migrations.open_stream(
                    target, call.path, leg, body, self.headers, call.deadline, self.request_id, self.moved),
                    discard=lambda opened: opened[0].close())
            else:
                migrated = 0
                _, upstream = await call.watch.run(on_live_instance(
                    state.pool, target.role, target,
                    lambda d: state.proxy.open_stream(d, call.path, leg, self.headers, call.deadline)),
                    discard=lambda opened: opened[1].close())
            if migrating:
                events = state.migrations.relay(upstream, call.path, body, call.chat, self.headers, call.deadline,
                                                self.request_id, self.moved, migrated)
            else:
                events = state.proxy.relay(upstream, call.deadline,
                                           not_migratable(body, call.chat) if state.migrations.limit else None)
            self.legs.append(upstream.instance.name)
            self.outcome = "streaming"
            return self._relayed(upstream, events)
        decode, answer = await call.watch.run(state.migrations.answer(
            target, call.path, leg, body, self.headers, call.deadline, self.request_id, self.moved))
        self.legs.append(decode.name)
        self.outcome = "ok"
        if self.prefill_answer is not None and body.get("prompt_logprobs") is not None:
            answer = with_prompt_logprobs(answer, self.prefill_answer, call.chat)
        return JSONResponse(self._reported(answer), headers={"X-Request-Id": self.request_id})

    def _relayed(self, upstream: Upstream, events: AsyncGenerator[bytes, None]) -> ClosingStreamingResponse:
        """The decode's stream (`events`) passed through to the client."""
        relayed_all = False

        async def relay() -> AsyncIterator[bytes]:
            nonlocal relayed_all
            async for chunk in events:
                yield self._with_reported_usage(chunk)
            relayed_all = True

        async def close() -> None:
            self.unqueue()
            await events.aclose()  # its own finally closes a migrated stream's current upstream
            await upstream.close()
            if not relayed_all:
                # The client left mid-stream (the decode streams the first token before the KV
                # arrives): the decode may never read the prefill's KV, so it goes back now.
                self.release_held()

        return ClosingStreamingResponse(relay(), on_close=close,
                                        headers={"X-Request-Id": self.request_id, "Cache-Control": "no-cache"})


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
