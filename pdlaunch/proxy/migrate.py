"""Request migration: a decode leg whose instance dies or stalls mid-request goes on on another decode.

A streamed request is continued by recompute: the proxy asks its decode leg for the token ids and, when
that decode fails (leg_failure.py), sends another decode the continuation (continuation.py): the prompt's
ids + the generated ids whose text the client already has. The new decode's chunks are rewritten into the
client's stream, no text repeated or missing (stream_progress.py). Requests whose output depends on state
the continuation cannot rebuild from token ids are not migrated (continuation.not_migratable): their
stream ends with the error event, as without migration.

A decode that is stopping (SIGTERM, its pod deleted) is taken for gone too: one that answers 503 shutting_down before
any of its answer was sent (leg_failure.ShutDown), and one whose drain cuts a stream, which it ends with the
shutting_down error event (http/shutdown_answer.py; upstream.cut_by_shutdown): the stream goes on elsewhere, the event
not relayed. Where nothing can go on (no other decode ready, the limit reached, a stream that cannot be continued),
the client gets that 503 shutting_down, or the event, which says to retry on a running server, not a 502.

A request that is not streamed has nothing at the client yet: it is sent again, whole, to another
decode (which computes the prompt itself). A leg given up because its decode stalled while another was ready, when no
other is ready any more once the leg has ended (the health probe marked it down meanwhile), goes again to the stalled
decode, without the prefill's KV and not counted as a migration: as a stall with no other decode ready, the request
waits for that decode to answer again (leg_failure.unless_stalled); a stream the client has some of goes on there as
its continuation, as a migration's would (`relay`). At most `limit` migrations per request; then the request fails
with code `migration_limit`.

Every leg that moves goes without the prefill's kv_transfer_params (`fresh_leg`), the prefill's hold released first:
the decode it leaves may have read that KV, and the prefill freed it at the read_done. So does the one retry of a leg
whose decode dropped the connection, or answered shutting_down, with migration off too (retry.py; `afresh`); only a
decode that refused the connection never got the leg, and the retry keeps the params.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from pdlaunch.http.errors import OpenAIError, error_body
from pdlaunch.http.sse import sse_data, sse_event
from pdlaunch.proxy.bodies import Body, JsonObject, as_object
from pdlaunch.proxy.continuation import continuation_body, not_migratable
from pdlaunch.proxy.instances import Instance
from pdlaunch.proxy.leg_failure import Failure, ShutDown, Stalled, another, leg_events, others, unless_stalled
from pdlaunch.proxy.retry import Afresh, gone, on_live_instance
from pdlaunch.proxy.stream_progress import Progress
from pdlaunch.proxy.translate import is_shutting_down
from pdlaunch.proxy.upstream import STOPPING, Proxy, Upstream, cut_by_shutdown

log = logging.getLogger("pdlaunch.proxy")

DEFAULT_MIGRATION_LIMIT = 3
LIMIT_CODE = "migration_limit"

T = TypeVar("T")
# A continuation that did not open: (its decode, why, that decode's shutting_down event where it stopped)
Unopened = tuple[Instance, Failure, str | None]


def fresh_leg(body: Body, leg: JsonObject) -> JsonObject:
    """The decode leg of `body` for a decode that computes the prompt itself: the client's request without
    kv_transfer_params, return_token_ids as `leg` (the leg it replaces) asked."""
    asked_ids = {"return_token_ids": True} if leg.get("return_token_ids") else {}
    return {**{k: v for k, v in body.items() if k != "kv_transfer_params"}, **asked_ids}


def afresh(leg: JsonObject, body: Body, send: Callable[[Instance, JsonObject], Awaitable[T]],
           on_migrate: Callable[[], None]) -> Afresh[T] | None:
    """How `leg` goes to another decode when its own may have begun it (retry.py `Afresh`): `on_migrate()` (the
    prefill's held KV goes back), then `send(decode, fresh_leg(...))`. None for a leg that names no prefill's KV: it
    goes again as it is."""
    if "kv_transfer_params" not in leg:
        return None

    async def call(instance: Instance) -> T:
        on_migrate()
        return await send(instance, fresh_leg(body, leg))

    return Afresh(call, "the prefill's kv_transfer_params (it computes the prompt itself)")


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
        """A whole (not streamed) answer; a decode that dies, stalls or shuts down before answering is replaced by
        another that computes the prompt itself (`on_migrate()` first: the prefill's held KV goes back),
        at most `limit` times; with `limit` 0, once as retry.py retries a gone instance's leg (`afresh`)."""
        pool, migrations = self.proxy.pool, 0

        def post(instance: Instance, leg: JsonObject) -> Awaitable[JsonObject]:
            return self._post_unless_stalled(instance, path, leg, headers, deadline)

        while True:
            stopped: OpenAIError | None = None  # the 503 of a decode that stops: the answer if nothing goes on
            try:
                return await on_live_instance(pool, target.role, target, functools.partial(post, leg=leg),
                                              afresh(leg, body, post, on_migrate))
            except Stalled as stalled:
                if not others(pool, stalled.instance):
                    target, leg = stalled.instance, self._back_to_stalled(stalled.instance, leg, body, request_id,
                                                                          on_migrate)
                    continue
                failed, reason, what = stalled.instance, "stalled", "stalled"
            except ShutDown as stop:
                if not others(pool, stop.instance):
                    raise stop.error from None  # without another decode its answer stands
                failed, reason, what, stopped = stop.instance, "died", "shut down", stop.error
            except OpenAIError as exc:
                # A refused or dropped connection (the leg went to another decode once: retry.py); an error
                # answer is the instance's word.
                if not gone(exc) or self.limit == 0 or not others(pool, target):
                    raise  # without another decode the first error stands
                failed, reason, what = target, "died", "died"
            if migrations >= self.limit:
                exhausted = self._exhausted(request_id)
                raise stopped or exhausted  # a 503 shutting_down says to retry
            migrations += 1
            self.on_migrate(reason)
            on_migrate()
            target = another(pool, failed)
            leg = fresh_leg(body, leg)
            log.info("request %s: %s %s mid-request; sent again to %s (migration %d of %d)", request_id,
                     failed.name, what, target.name, migrations, self.limit)

    async def open_stream(self, target: Instance, path: str, leg: JsonObject, body: Body, headers: dict[str, str],
                          deadline: float, request_id: str, on_migrate: Callable[[], None]) -> tuple[Upstream, int]:
        """(the decode leg's open stream, migrations it took). A decode marked stalled, or that answers shutting_down,
        before it answers the response headers is left for another, which gets the request whole (nothing reached the
        client yet; `on_migrate()` first: the prefill's held KV goes back), at most `limit` times; so is one gone
        (refused or dropped the connection) after the leg's one retry on another (retry.py) found that one gone too."""
        migrations = 0

        def open_leg(instance: Instance, leg: JsonObject) -> Awaitable[Upstream]:
            return self._open_unless_stalled(instance, path, leg, headers, deadline)

        while True:
            stopped: OpenAIError | None = None  # the 503 of a decode that stops: the answer if nothing goes on
            try:
                _, upstream = await on_live_instance(self.proxy.pool, target.role, target,
                                                     functools.partial(open_leg, leg=leg),
                                                     afresh(leg, body, open_leg, on_migrate))
                return upstream, migrations
            except Stalled as stalled:
                if not others(self.proxy.pool, stalled.instance):
                    target, leg = stalled.instance, self._back_to_stalled(stalled.instance, leg, body, request_id,
                                                                          on_migrate)
                    continue
                failed, reason, what = stalled.instance, "stalled", "stalled"
            except ShutDown as stop:
                if not others(self.proxy.pool, stop.instance):
                    raise stop.error from None  # without another decode its answer stands
                failed, reason, what, stopped = stop.instance, "died", "shut down", stop.error
            except OpenAIError as exc:
                # A refused or dropped connection after the leg went to another decode once (retry.py), as `answer`
                # moves a whole request: two decodes gone at once; an error answer is the instance's word.
                if not gone(exc) or not others(self.proxy.pool, target):
                    raise  # without another decode the first error stands
                failed, reason, what = target, "died", "died"
            if migrations >= self.limit:
                exhausted = self._exhausted(request_id)
                raise stopped or exhausted  # a 503 shutting_down says to retry
            migrations += 1
            self.on_migrate(reason)
            on_migrate()
            target = another(self.proxy.pool, failed)
            # return_token_ids as the first leg had it: asked for a stream relayed with migration (relay)
            leg = fresh_leg(body, leg)
            log.info("request %s: %s %s before answering the stream's headers; sent again to %s (migration "
                     "%d of %d)", request_id, failed.name, what, target.name, migrations, self.limit)

    def _back_to_stalled(self, stalled: Instance, leg: JsonObject, body: Body, request_id: str,
                         on_migrate: Callable[[], None]) -> JsonObject:
        """The leg that goes again to `stalled`: its leg there was given up for another decode (unless_stalled saw one
        ready), but none is ready now that the leg has ended (marked down meanwhile), so the request waits for the
        stalled decode, as with no other decode at all. `stalled` may have read the prefill's KV before its leg was
        cancelled: the leg goes without it (`on_migrate()`: the prefill's hold released), not a migration."""
        on_migrate()
        log.info("request %s: %s stalled, and no other decode is ready now to take the request; sent again to it, "
                 "to wait until it answers", request_id, stalled.name)
        return fresh_leg(body, leg)

    async def _open_unless_stalled(self, instance: Instance, path: str, leg: JsonObject, headers: dict[str, str],
                                   deadline: float) -> Upstream:
        """The leg's open stream; Stalled or ShutDown for a decode to leave (not retried by on_live_instance: the
        leg goes on on another decode without its KV params, as a migration)."""
        stream = self.proxy.open_stream(instance, path, leg, headers, deadline)
        try:
            return await unless_stalled(self.proxy.pool, instance, stream, discard=Upstream.close)
        except OpenAIError as exc:
            if is_shutting_down(exc):
                raise ShutDown(instance, exc) from None
            raise

    async def _post_unless_stalled(self, instance: Instance, path: str, leg: JsonObject,
                                   headers: dict[str, str], deadline: float) -> JsonObject:
        """The leg's whole answer; Stalled or ShutDown for a decode to leave (as _open_unless_stalled). Without
        migration, a decode that answers shutting_down is retried once by on_live_instance, as a gone one."""
        post = self.proxy.post_json(instance, path, leg, headers, deadline)
        if self.limit == 0:
            return await post
        try:
            return await unless_stalled(self.proxy.pool, instance, post)
        except OpenAIError as exc:
            if is_shutting_down(exc):
                raise ShutDown(instance, exc) from None
            raise

    async def relay(self, upstream: Upstream, path: str, body: Body, chat: bool, headers: dict[str, str],
                    deadline: float, request_id: str, on_migrate: Callable[[], None],
                    migrated: int = 0) -> AsyncGenerator[bytes, None]:
        """The client's stream: `upstream`'s events, continued on another decode when it fails
        (`on_migrate()` runs before each continuation: the prefill's held KV goes back); `migrated`:
        migrations the request took before its headers (open_stream). A decode that stops (its shutting_down event,
        or its 503 to a continuation) fails as a dead one; where the stream cannot go on, its client gets the
        shutting_down event (it says to retry) rather than a 502. One given up for a stall while another decode was
        ready, none ready any more once it ended, goes on on the stalled decode, not counted as a migration."""
        progress = Progress(chat=chat, client_ids=bool(body.get("return_token_ids")))
        current, continued, migrations = upstream, False, migrated
        unopened: Unopened | None = None  # a continuation's decode that stalled or stopped before its headers
        try:
            while True:
                # stopped: the failed decode's shutting_down event, the client's end if nothing goes on
                failed, failure, stopped = unopened or (current.instance, None, None)
                unopened = None
                if failure is None:  # a leg whose stream opened: read on until it ends or fails
                    events = leg_events(self.proxy, current, deadline)
                    async for event in events:
                        if isinstance(event, Failure):
                            failure = event
                            break
                        if cut_by_shutdown(event) and not self.proxy.stopping.is_set():  # the decode's, not ours
                            self.proxy.pool.mark_down(failed, STOPPING)
                            stopped, failure = event, Failure("died", f"{failed.name} ({failed.url}) is shutting "
                                                                      "down: its drain cut the stream")
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
                            raise OpenAIError(502, f"{failed.name} ({failed.url}) sent a chunk with {exc} in its "
                                                   "token_ids or prompt_token_ids", code="instance_failed") from None
                        if shown is not None:
                            yield sse_event(shown)
                    await events.aclose()
                    await current.close()
                    if progress.done:
                        return
                    if failure is None:
                        failure = Failure("died", f"{failed.name} ({failed.url}) closed the stream before it finished")
                    if progress.finished:  # the last token's chunk arrived; the usage chunk and [DONE] were lost
                        if _include_usage(body) and not progress.usage_sent and progress.prompt_ids is not None:
                            yield sse_event(progress.usage_chunk())
                        yield sse_data("[DONE]")
                        return
                    why_not = _not_continued(progress)
                    if why_not is not None:
                        yield _final(stopped, error_body(502, f"{failure.message} ({why_not}; not migrated)",
                                                         code="instance_failed"))
                        return
                target = self._next_decode(failed, failure, migrations, request_id, progress.committed, on_migrate)
                if not isinstance(target, Instance):  # nowhere to go
                    yield _final(stopped, target)
                    return
                if target is not failed:
                    migrations += 1
                leg_path, leg, continued = _next_leg(progress, path, body, chat)
                opened = await self._open_continuation(target, leg_path, leg, headers, deadline)
                if isinstance(opened, Upstream):
                    current = opened
                else:
                    unopened = opened
        except OpenAIError as exc:
            yield sse_event(exc.body())
        finally:
            await current.close()

    def _next_decode(self, failed: Instance, failure: Failure, migrations: int, request_id: str, committed: int,
                     on_migrate: Callable[[], None]) -> Instance | JsonObject:
        """The decode a stream goes on on after its leg on `failed` failed (`on_migrate()` run: the prefill's held KV
        goes back), or the error that ends it. Another decode is a migration (`migrations`: those taken so far).
        With none ready, a leg given up for a stall (leg_events, unless_stalled saw another ready, marked down
        since) goes back to its stalled decode, as _back_to_stalled, to wait until it answers: not a migration.
        Otherwise the failure as it is, or past the limit the request's migration_limit error."""
        if others(self.proxy.pool, failed):
            if migrations >= self.limit:
                return self._exhausted(request_id).body()
            self.on_migrate(failure.reason)
            on_migrate()
            target = another(self.proxy.pool, failed)
            log.info("request %s: %s; continuing on %s from %d output tokens (migration %d of %d)",
                     request_id, failure.message, target.name, committed, migrations + 1, self.limit)
            return target
        if failure.reason != "stalled":
            return error_body(502, failure.message, code="instance_failed")
        on_migrate()
        log.info("request %s: %s, and no other decode is ready now to take the stream; continuing on it from %d "
                 "output tokens, to wait until it answers", request_id, failure.message, committed)
        return failed

    async def _open_continuation(self, target: Instance, path: str, leg: JsonObject, headers: dict[str, str],
                                 deadline: float) -> Upstream | Unopened:
        """The continuation's open stream, on `target` (or once on another where `target` is gone: retry.py); or, as
        for the first leg (open_stream), the decode that stalled or answered shutting_down before the stream's headers,
        why, and its 503 as a stream's event (the client's end if nothing goes on); or `target` when that retry found
        its decode gone too (refused or dropped the connection) and another is ready."""
        open_leg = functools.partial(self._open_unless_stalled, path=path, leg=leg, headers=headers, deadline=deadline)
        try:
            return (await on_live_instance(self.proxy.pool, target.role, target, open_leg))[1]
        except OpenAIError as exc:
            if not gone(exc) or not others(self.proxy.pool, target):
                raise  # an error answer is the instance's word; without another decode the error ends the stream
            return target, Failure("died", exc.message), None
        except Stalled as stalled:
            return stalled.instance, Failure("stalled", f"{stalled.instance.name} ({stalled.instance.url}) stalled "
                                                        "before answering the stream's headers"), None
        except ShutDown as stop:
            return stop.instance, Failure("died", f"{stop.instance.name} ({stop.instance.url}) answered "
                                                  "shutting_down: it is stopping"), \
                json.dumps(stop.error.body(), separators=(",", ":"))


def _final(stopped: str | None, error: JsonObject) -> bytes:
    """The error event that ends a stream that cannot go on (the response adds [DONE]: sse.ending_with_done): the
    shutting_down event of the decode that stopped (`stopped`), as it came, or else `error`'s."""
    return sse_data(stopped) if stopped is not None else sse_event(error)


def _not_continued(progress: Progress) -> str | None:
    """Why a stream the client has some of cannot go on from its token ids (None: it can, or it has nothing yet)."""
    if progress.head is not None and progress.prompt_ids is None:
        return "its stream carried no prompt token ids to continue from"
    if progress.bundled:  # a continuation might skip the text of ids held back (stream_progress.py)
        return (f"its last chunk with text carried {progress.bundled} token ids at once, as a decode with speculative "
                "decoding or a stream interval sends them, and the proxy cannot tell whether that text covers the "
                "last of them")
    return None


def _next_leg(progress: Progress, path: str, body: Body, chat: bool) -> tuple[str, JsonObject, bool]:
    """(path, body, whether it continues the client's stream) of the leg that goes on after a failed one."""
    if progress.prompt_ids is None:  # nothing reached the client: the request again, whole
        return path, {**{k: v for k, v in body.items() if k != "kv_transfer_params"}, "return_token_ids": True}, False
    # The client has the text (and, asking for them, the ids) of the ids up to `committed`; the next decode makes
    # again those after it, maybe other ones.
    progress.offset = progress.committed
    del progress.ids[progress.committed:]
    return "/v1/completions", continuation_body(body, chat, progress.prompt_ids + progress.ids,
                                                progress.committed), True


def _json_object(event: str) -> dict[str, Any] | None:
    """The event's payload as a JSON object, or None (not JSON, or JSON of another kind)."""
    try:
        value = json.loads(event)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _include_usage(body: Body) -> bool:
    """Whether the client asked for a usage chunk: stream_options.include_usage true (absent or null is false, as
    vLLM's and OpenAI's default, server/request_fields.py)."""
    options = as_object(body.get("stream_options"))
    return options is not None and options.get("include_usage") is True
