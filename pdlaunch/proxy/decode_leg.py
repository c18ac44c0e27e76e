"""The decode leg of one prompt's request (a base of prompt_request.PromptRequest): the decode's stream passed
through to the client, moved to another decode when that one fails (migrate.py), or its whole answer; either
reports the cached tokens of the prefill leg's instance. Once the decode leg will not read the KV a prefill
holds for it, the hold goes back (release.py): also when the leg is retried on another decode because its own
dropped the connection or answered shutting_down (retry.py), since that one may have read the KV already; the
new decode computes the prompt, as after a migration.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from fastapi.responses import JSONResponse, Response

from pdlaunch.http.sse import DONE, ClosingStreamingResponse, sse_event
from pdlaunch.proxy.bodies import JsonObject
from pdlaunch.proxy.call import Call
from pdlaunch.proxy.continuation import not_migratable
from pdlaunch.proxy.instances import Instance
from pdlaunch.proxy.migrate import afresh
from pdlaunch.proxy.retry import on_live_instance
from pdlaunch.proxy.translate import prefill_cached_tokens, with_cached_tokens, with_prompt_logprobs
from pdlaunch.proxy.upstream import Upstream

_ERROR_EVENT = b'data: {"error"'  # an OpenAI error event, as the relays pass it on (upstream.py, migrate.py)


class DecodeLeg:
    """The decode leg of `PromptRequest` (its base), and the prefill's hold it ends."""

    # The request's parts these methods read; PromptRequest's fields.
    call: Call
    body: JsonObject
    request_id: str
    headers: dict[str, str]
    legs: list[str]
    held: tuple[Instance, JsonObject] | None
    prefill_answer: JsonObject | None
    migrated: bool
    outcome: str
    unqueue: Callable[[], None]
    ended: Callable[[], None]

    def release_held(self) -> None:
        if self.held is not None:
            self.call.state.proxy.kv.release_soon(*self.held)
            self.held = None  # once: a migration and the request's end may both ask

    def moved(self) -> None:
        """The decode leg moves to another decode without the prefill's KV (a migration, or a retry after its decode
        dropped the connection or answered shutting_down: migrate.py `afresh`): the prefill's held KV goes back, and
        its prompt tokens stop counting as queued (or spilled) on the decode it leaves (a restarted decode would
        otherwise look busy with requests that run elsewhere until they end)."""
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
            else:  # one retry when the decode is gone (retry.py), without the prefill's KV if it may have read it
                migrated = 0

                def open_leg(decode: Instance, leg: JsonObject) -> Awaitable[Upstream]:
                    return state.proxy.open_stream(decode, call.path, leg, self.headers, call.deadline)

                _, upstream = await call.watch.run(on_live_instance(
                    state.pool, target.role, target, functools.partial(open_leg, leg=leg),
                    afresh(leg, body, open_leg, self.moved)),
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
        whole = False  # the last event relayed is [DONE], and no error event came before it

        async def relay() -> AsyncIterator[bytes]:
            nonlocal whole
            failed = False
            async for chunk in events:
                failed = failed or chunk.startswith(_ERROR_EVENT)
                whole = chunk == DONE and not failed  # the decode's side ended whole, whether the client reads it
                yield self._with_reported_usage(chunk)

        async def close() -> None:
            self.unqueue()
            try:
                await events.aclose()  # its own finally closes a migrated stream's current upstream
                await upstream.close()
            finally:
                if not whole:
                    # The client left mid-stream, or the decode failed mid-stream and the stream ended with the error
                    # event (not continued elsewhere): the decode streams the first token before the KV arrives, so
                    # it may never read the prefill's KV, which goes back now rather than at the end of its lease.
                    self.release_held()
                self.ended()

        return ClosingStreamingResponse(relay(), on_close=close,
                                        headers={"X-Request-Id": self.request_id, "Cache-Control": "no-cache"})
