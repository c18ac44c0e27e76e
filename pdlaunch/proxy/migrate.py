"""Request migration: a decode leg whose instance dies or stalls mid-request goes on on another decode.

A streamed request is continued by recompute: the proxy asks its decode leg for the token ids
(`return_token_ids`, which also brings the prompt's ids in the first chunk) and, when that decode
drops the connection, ends its stream without a final chunk, or is marked stalled (its /health probe
past proxy.health_timeout_seconds: instances.py), sends another decode a /v1/completions request
whose prompt is the prompt's ids + the generated ids whose text the client already has, with
max_tokens (and min_tokens) reduced by their number. Ids generated after the last chunk that carried
text (the old decode held their text back: a character not complete yet) are not in that prompt: the
new decode makes them again and hands out their text; a greedy stream is then the uninterrupted
run's text, with no character repeated or missing. A seeded sampled stream is too: the continuation carries
`seed_offset` = the client's own (if any) + the generated ids in its prompt, so its generator skips the
draws those tokens took and draws the rest as the uninterrupted run would (engine/first_token.py
skip_draws). The new decode's chunks are rewritten into the client's stream (its id, model, object; chat
deltas; usage counting the whole request).

Not migrated (the stream ends with the error event, as without migration): requests whose output
depends on state the continuation cannot rebuild from token ids: stop strings (one may span the
migration point), tools and structured outputs (parser and grammar state), presence / frequency
penalties and bad_words (the engine counts and matches them over the output only, and the output before
the cut is the continuation's prompt), logprobs (`logprobs: 0` too: the chosen tokens' logprobs), several
choices, echo. A repetition penalty goes on: it counts prompt and output tokens alike.

A request that is not streamed has nothing at the client yet: it is sent again, whole, to another
decode (which computes the prompt itself). At most `limit` migrations per request; then the request
fails with code `migration_limit`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from pydantic import JsonValue

from pdlaunch.engine.outputs import SAMPLING_EPS
from pdlaunch.http.errors import OpenAIError, error_body
from pdlaunch.http.sse import SSEParser, sse_data, sse_event
from pdlaunch.proxy.bodies import Body, JsonObject, as_object, ids_of, int_of, list_of, objects, token_limit
from pdlaunch.proxy.instances import Instance
from pdlaunch.proxy.retry import gone, on_live_instance
from pdlaunch.proxy.upstream import ChunkReader, Interrupted, Proxy, Upstream, shutting_down_body, stream_payloads
from pdlaunch.server.protocol import DEFAULT_MAX_TOKENS

log = logging.getLogger("pdlaunch.proxy")

DEFAULT_MIGRATION_LIMIT = 3
T = TypeVar("T")
LIMIT_CODE = "migration_limit"
# Fields copied into a continuation: sampling that depends only on the prompt + output token ids.
# include_stop_str_in_output: the text of a stop token id (or EOS) that ends the continuation.
_CONTINUED_FIELDS = ("model", "user", "temperature", "top_p", "top_k", "seed", "min_p", "stop_token_ids",
                     "ignore_eos", "logit_bias", "allowed_token_ids", "repetition_penalty",
                     "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
                     "stream_options")


def not_migratable(body: Body, chat: bool) -> str | None:
    """The field (module doc) that keeps a streamed request from being continued from token ids, or None."""
    if body.get("stop"):
        return "stop"  # a stop string may span the migration point
    if chat and (body.get("tools") or body.get("tool_choice") not in (None, "none")):
        return "tools" if body.get("tools") else "tool_choice"
    if body.get("response_format") not in (None, {"type": "text"}):  # {"type": "text"}: OpenAI's default, no grammar
        return "response_format"
    constrained = [k for k in ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
                   if body.get(k) is not None]
    if constrained:
        return constrained[0]
    penalized = [k for k in ("presence_penalty", "frequency_penalty") if body.get(k) not in (None, 0, 0.0)]
    if penalized:
        return penalized[0]
    if body.get("bad_words"):
        return "bad_words"
    logprobs = body.get("logprobs")  # completions' 0 asks for the chosen tokens' logprobs (0 == False in Python)
    if logprobs is not None and logprobs is not False:  # chat's top_logprobs asks for nothing without it
        return "logprobs"
    several = [k for k in ("n", "best_of") if body.get(k) not in (None, 1)] + (["echo"] if body.get("echo") else [])
    return several[0] if several else None


def max_tokens_of(body: Body, chat: bool) -> int | None:
    """The client's output limit; None when it names none that applies (a chat request without one, a
    completion's null max_tokens): the instance then fills the context (server/protocol.fills_context)."""
    limit = int_of(token_limit(body, chat, "max_completion_tokens", "max_tokens"))
    if limit is not None:
        return limit
    return None if chat or "max_tokens" in body else DEFAULT_MAX_TOKENS


def continuation_body(body: Body, chat: bool, token_ids: list[int], generated: int) -> JsonObject:
    """The /v1/completions request that goes on from `token_ids` (prompt + `generated` output ids)."""
    leg = {k: body[k] for k in _CONTINUED_FIELDS if k in body}
    limit = max_tokens_of(body, chat)
    # null: the continuation, a completion, fills the context as the client's request would have
    leg.update(prompt=list(token_ids), max_tokens=None if limit is None else max(1, limit - generated), stream=True,
               return_token_ids=True)
    min_tokens = int_of(body.get("min_tokens"))  # the instances read no other name (min_completion_tokens is none)
    if min_tokens:
        leg["min_tokens"] = max(0, min_tokens - generated)
    if body.get("seed") is not None and not _greedy(body):  # token k was the seed's draw seed_offset + k (sampler.py)
        leg["seed_offset"] = (int_of(body.get("seed_offset")) or 0) + generated
    return leg


def _greedy(body: Body) -> bool:
    """Whether the instance samples `body` greedily (engine/outputs.py SamplingParams.greedy: a temperature below
    SAMPLING_EPS, absent = 1.0, or top_k 1): it draws nothing, and takes no seed_offset."""
    temperature = body.get("temperature")
    cold = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature < SAMPLING_EPS
    return cold or int_of(body.get("top_k")) == 1


@dataclass
class _Progress:
    """What the client has of one streamed request."""

    chat: bool
    client_ids: bool  # the client asked for return_token_ids itself
    prompt_ids: list[int] | None = None
    ids: list[int] = field(default_factory=list)  # output ids received, in order
    committed: int = 0  # of `ids`: those whose text the client has
    skip: int = 0  # ids the current decode makes again (they were after `committed`): not shown twice
    offset: int = 0  # output ids given in the current decode's prompt
    head: JsonObject | None = None  # id / object / created / model of the client's stream
    finished: bool = False  # a finish_reason was sent
    usage_sent: bool = False  # a chunk with usage was sent
    done: bool = False  # [DONE] or an error event was sent

    def rewrite(self, chunk: JsonObject, continued: bool) -> JsonObject | None:
        """Record `chunk`'s ids and text; the chunk as the client gets it (None: nothing for the client,
        a chunk sent only for the ids we asked for). ValueError for ids that are not integers (bodies.ids_of)."""
        if self.head is None:
            self.head = {k: chunk.get(k) for k in ("id", "object", "created", "model")}
        prompt_ids = chunk.get("prompt_token_ids")
        for choice in objects(chunk.get("choices")):
            prompt_ids = choice.get("prompt_token_ids", prompt_ids)
            ids = ids_of(choice.get("token_ids"))
            shown = ids[self.skip:]  # the client (asking for ids) had the others before the migration
            self.skip -= len(ids) - len(shown)
            self.ids += ids
            delta = as_object(choice.get("delta")) or {}
            text = choice.get("text") if "text" in choice else delta.get("content")
            if text:  # the decode's detokenizer consumed every id so far (a chunk is one step: one token here)
                self.committed = len(self.ids)
            if choice.get("finish_reason") is not None:
                self.finished = True
            if self.client_ids:
                choice["token_ids"] = list(shown)
        if self.prompt_ids is None and isinstance(prompt_ids, list):
            self.prompt_ids = ids_of(prompt_ids)
        self.usage_sent = self.usage_sent or bool(chunk.get("usage"))
        if continued:
            chunk = self._as_client_chunk(chunk)
        if not self.client_ids:
            chunk.pop("prompt_token_ids", None)
            for choice in objects(chunk.get("choices")):
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
            if _carries_nothing(chunk):
                return None
        return chunk

    def _as_client_chunk(self, chunk: JsonObject) -> JsonObject:
        """A continuation's completion chunk in the client's stream (same id; a chat delta for chat)."""
        out = {**chunk, **(self.head or {})}
        out.pop("prompt_token_ids", None)
        choices: list[JsonValue] = []
        for choice in list_of(chunk.get("choices")):
            if self.chat and isinstance(choice, dict):
                entry: JsonObject = {"index": 0, "delta": {"content": choice.get("text", "")},
                                     "finish_reason": choice.get("finish_reason"), "logprobs": None}
                if self.client_ids:
                    entry["token_ids"] = choice.get("token_ids", [])
                choices.append(entry)
            elif isinstance(choice, dict):  # the continuation's prompt (the client's + output ids) is not the client's
                choices.append({k: v for k, v in choice.items() if k != "prompt_token_ids"})
        out["choices"] = choices
        usage = as_object(chunk.get("usage"))
        if usage is not None and self.prompt_ids is not None:
            out["usage"] = self.usage(int_of(usage.get("completion_tokens")) or 0, usage)
        return out

    def usage(self, continued_tokens: int, continuation: JsonObject | None = None) -> JsonObject:
        """The whole request's usage: the client's prompt once, every output token once (`continued_tokens`
        made by the current decode after the `offset` its prompt carried); cached tokens, as the continuation's
        decode counted them, at most the client's prompt (its cache may hold the output ids it was sent too)."""
        prompt = len(self.prompt_ids or [])
        completion = continued_tokens + self.offset
        out: JsonObject = {**(continuation or {}), "prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
        details = as_object(out.get("prompt_tokens_details"))
        cached = int_of(details.get("cached_tokens")) if details is not None else None
        if details is not None and cached is not None:
            out["prompt_tokens_details"] = {**details, "cached_tokens": min(cached, prompt)}
        return out

    def usage_chunk(self) -> JsonObject:
        """The usage chunk (stream_options.include_usage) of a stream whose decode failed after its last token's
        chunk, before the usage chunk: counted from the ids received (the cached tokens are not known)."""
        return {**(self.head or {}), "choices": [], "usage": self.usage(len(self.ids) - self.offset)}


class Migrations:
    """Runs decode legs that move to another decode when theirs dies or stalls. `on_migrate(reason)`
    counts each migration (reason: died, stalled), `on_exhausted()` each request past the limit."""

    def __init__(self, proxy: Proxy, limit: int, on_migrate: Callable[[str], None] = lambda reason: None,
                 on_exhausted: Callable[[], None] = lambda: None) -> None:
        if limit < 0:
            raise ValueError(f"migration limit {limit}: must be 0 or more")
        self.proxy = proxy
        self.limit = limit
        self.on_migrate = on_migrate
        self.on_exhausted = on_exhausted

    def streams(self, body: Body, chat: bool) -> bool:
        """Whether a streamed request of this body is relayed with migration (then its decode leg
        asks for return_token_ids)."""
        return self.limit > 0 and not_migratable(body, chat) is None

    def _exhausted(self, request_id: str) -> OpenAIError:
        self.on_exhausted()
        return OpenAIError(502, f"request {request_id}: its decode failed after {self.limit} migrations "
                                "(proxy.migration_limit); no other decode could finish it", code=LIMIT_CODE)

    async def answer(self, target: Instance, path: str, leg: JsonObject, body: Body, headers: dict[str, str],
                     deadline: float, request_id: str,
                     on_migrate: Callable[[], None] = lambda: None) -> tuple[Instance, JsonObject]:
        """A whole (not streamed) answer; a decode that dies or stalls before answering is replaced by
        another that computes the prompt itself (`on_migrate()` first: the prefill's held KV goes back),
        at most `limit` times."""
        pool, migrations = self.proxy.pool, 0
        while True:
            try:
                call = functools.partial(self._post_unless_stalled, path=path, leg=leg, headers=headers,
                                         deadline=deadline)
                return await on_live_instance(pool, target.role, target, call)
            except _Stalled as stalled:
                failed, reason = stalled.instance, "stalled"
            except OpenAIError as exc:
                # A refused or dropped connection (the leg went to another decode once: retry.py); an error
                # answer is the instance's word.
                if not gone(exc) or self.limit == 0 or not self._others(target):
                    raise  # without another decode the first error stands
                failed, reason = target, "died"
            if migrations >= self.limit:
                raise self._exhausted(request_id)
            migrations += 1
            self.on_migrate(reason)
            on_migrate()
            target = self._another(failed)
            leg = {k: v for k, v in body.items() if k != "kv_transfer_params"}
            log.info("request %s: %s %s mid-request; sent again to %s (migration %d of %d)", request_id,
                     failed.name, reason, target.name, migrations, self.limit)

    async def open_stream(self, target: Instance, path: str, leg: JsonObject, body: Body, headers: dict[str, str],
                          deadline: float, request_id: str, on_migrate: Callable[[], None]) -> tuple[Upstream, int]:
        """(the decode leg's open stream, migrations it took). A decode marked stalled before it answers the
        response headers is left for another, which gets the request whole (nothing reached the client yet;
        `on_migrate()` first: the prefill's held KV goes back), at most `limit` times."""
        migrations = 0
        while True:
            call = functools.partial(self._open_unless_stalled, path=path, leg=leg, headers=headers,
                                     deadline=deadline)
            try:
                _, upstream = await on_live_instance(self.proxy.pool, target.role, target, call)
                return upstream, migrations
            except _Stalled as stalled:
                failed = stalled.instance
            if migrations >= self.limit:
                raise self._exhausted(request_id)
            migrations += 1
            self.on_migrate("stalled")
            on_migrate()
            target = self._another(failed)
            # return_token_ids as the first leg had it: asked for a stream relayed with migration (relay)
            asked_ids = {"return_token_ids": True} if leg.get("return_token_ids") else {}
            leg = {**{k: v for k, v in body.items() if k != "kv_transfer_params"}, **asked_ids}
            log.info("request %s: %s stalled before answering the stream's headers; sent again to %s (migration "
                     "%d of %d)", request_id, failed.name, target.name, migrations, self.limit)

    async def _open_unless_stalled(self, instance: Instance, path: str, leg: JsonObject, headers: dict[str, str],
                                   deadline: float) -> Upstream:
        return await self._unless_stalled(instance, self.proxy.open_stream(instance, path, leg, headers, deadline),
                                          discard=Upstream.close)

    async def _post_unless_stalled(self, instance: Instance, path: str, leg: JsonObject,
                                   headers: dict[str, str], deadline: float) -> JsonObject:
        if self.limit == 0:
            return await self.proxy.post_json(instance, path, leg, headers, deadline)
        return await self._unless_stalled(instance, self.proxy.post_json(instance, path, leg, headers, deadline))

    async def _unless_stalled(self, instance: Instance, work: Awaitable[T],
                              discard: Callable[[T], Awaitable[None]] | None = None) -> T:
        """`work`'s result, or _Stalled when `instance` is marked stalled first and another instance of its
        role is ready (then `work` is cancelled: its in-flight count ends). Cancelled itself (the client left,
        another prompt of the request failed), it cancels `work` too, and `discard`s a result that came in
        meanwhile (an open stream nobody will read would hold its in-flight count and its decode forever)."""
        call = asyncio.ensure_future(work)
        stall = asyncio.ensure_future(instance.stalled.wait())
        try:
            await asyncio.wait({call, stall}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            if discard is not None and not call.cancelled() and call.exception() is None:
                await discard(call.result())
            raise
        finally:
            stall.cancel()
        if call.done() or not self._others(instance):  # no other decode: wait for this one
            return await call
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        raise _Stalled(instance)

    def _others(self, failed: Instance) -> list[Instance]:
        """Ready instances of `failed`'s role but `failed`."""
        pool = self.proxy.pool
        return [i for i in pool.instances if i.role == failed.role and i.state == "ready" and i is not failed]

    def _another(self, failed: Instance) -> Instance:
        """A ready instance of `failed`'s role other than it (only called when there is one)."""
        return self.proxy.pool.policy.choose(failed.role, self._others(failed))

    async def relay(self, upstream: Upstream, path: str, body: Body, chat: bool, headers: dict[str, str],
                    deadline: float, request_id: str, on_migrate: Callable[[], None],
                    migrated: int = 0) -> AsyncGenerator[bytes, None]:
        """The client's stream: `upstream`'s events, continued on another decode when it fails
        (`on_migrate()` runs before each continuation: the prefill's held KV goes back); `migrated`:
        migrations the request took before its headers (open_stream)."""
        progress = _Progress(chat=chat, client_ids=bool(body.get("return_token_ids")))
        current, continued, migrations = upstream, False, migrated
        try:
            while True:
                failure = None
                events = self._events(current, deadline)
                async for event in events:
                    if isinstance(event, _Failure):
                        failure = event
                        break
                    if event == "[DONE]" or event.startswith('{"error"'):
                        progress.done = True
                        yield sse_data(event)
                        continue
                    chunk = _json_object(event)
                    if chunk is None:  # not a JSON object: passed on as it came
                        yield sse_data(event)
                        continue
                    try:
                        shown = progress.rewrite(chunk, continued)
                    except ValueError as exc:
                        await events.aclose()
                        raise OpenAIError(502, f"{current.instance.name} ({current.instance.url}) sent a chunk "
                                               f"with {exc} in its token_ids or prompt_token_ids",
                                          code="instance_failed") from None
                    if shown is not None:
                        yield sse_event(shown)
                await events.aclose()
                await current.close()
                if progress.done:
                    return
                if failure is None:
                    failure = _Failure("died", f"{current.instance.name} ({current.instance.url}) closed the stream "
                                               "before it finished")
                if progress.finished:  # the last token's chunk arrived; the usage chunk and [DONE] were lost
                    if _include_usage(body) and not progress.usage_sent and progress.prompt_ids is not None:
                        yield sse_event(progress.usage_chunk())
                    yield sse_data("[DONE]")
                    return
                if progress.head is not None and progress.prompt_ids is None:
                    yield sse_event(error_body(502, failure.message + " (its stream carried no prompt token ids "
                                               "to continue from; not migrated)", code="instance_failed"))
                    return
                if not self._others(current.instance):  # nowhere to go: the failure as it is
                    yield sse_event(error_body(502, failure.message, code="instance_failed"))
                    return
                if migrations >= self.limit:
                    yield sse_event(self._exhausted(request_id).body())
                    return
                migrations += 1
                self.on_migrate(failure.reason)
                on_migrate()
                target = self._another(current.instance)
                if progress.prompt_ids is None:  # nothing reached the client: the request again, whole
                    leg_path, continued = path, False
                    leg = {**{k: v for k, v in body.items() if k != "kv_transfer_params"}, "return_token_ids": True}
                else:
                    progress.offset = progress.committed
                    progress.skip = len(progress.ids) - progress.committed
                    del progress.ids[progress.committed:]
                    leg_path, continued = "/v1/completions", True
                    leg = continuation_body(body, chat, progress.prompt_ids + progress.ids, progress.committed)
                log.info("request %s: %s; continuing on %s from %d output tokens (migration %d of %d)",
                         request_id, failure.message, target.name, progress.committed, migrations, self.limit)
                open_leg = functools.partial(self.proxy.open_stream, path=leg_path, body=leg, headers=headers,
                                             deadline=deadline)
                _, current = await on_live_instance(self.proxy.pool, target.role, target, open_leg)
        except OpenAIError as exc:
            yield sse_event(exc.body())
        finally:
            await current.close()

    async def _events(self, upstream: Upstream, deadline: float) -> AsyncGenerator[str | _Failure, None]:
        """`upstream`'s SSE payloads, then a _Failure if it failed (dropped, or its instance stalled)."""
        instance, parser = upstream.instance, SSEParser()
        reader = ChunkReader(upstream.response, deadline, stalled=instance.stalled, stopping=self.proxy.stopping)
        try:
            while True:
                try:
                    chunk = await reader.next()
                except Interrupted as stop:
                    if stop.reason == "stopping":  # the drain at shutdown ran out: the stream ends, not migrated
                        yield json.dumps(shutting_down_body(), separators=(",", ":"))
                        return
                    if stop.reason == "stalled":
                        yield _Failure("stalled", f"{instance.name} ({instance.url}) stalled (no /health answer "
                                                  f"within {self.proxy.pool.health_timeout_s:g}s)")
                        return
                    raise self.proxy.timed_out() from None  # the request's deadline: its 504
                except (httpx.HTTPError, TimeoutError) as exc:
                    self.proxy.failed(instance, exc)  # marks a dropped instance down
                    yield _Failure("died", f"{instance.name} ({instance.url}) failed mid-stream: "
                                           f"{type(exc).__name__}")
                    return
                if chunk is None:
                    return
                for data in stream_payloads(parser, chunk, instance):
                    yield data
        finally:
            reader.close()


def _json_object(event: str) -> dict[str, Any] | None:
    """The event's payload as a JSON object, or None (not JSON, or JSON of another kind)."""
    try:
        value = json.loads(event)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _include_usage(body: Body) -> bool:
    options = as_object(body.get("stream_options"))
    return options is not None and options.get("include_usage") is True


def _carries_nothing(chunk: JsonObject) -> bool:
    """No text, role, finish, usage or anything else a client reads."""
    if chunk.get("usage") or chunk.get("kv_transfer_params"):
        return False
    for choice in list_of(chunk.get("choices")):
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None or choice.get("text") or \
                choice.get("logprobs"):
            return False
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(v for k, v in delta.items()):
            return False
    return bool(chunk.get("choices"))


@dataclass
class _Failure:
    reason: str  # died | stalled
    message: str


class _Stalled(Exception):
    def __init__(self, instance: Instance) -> None:
        super().__init__(instance.name)
        self.instance = instance
