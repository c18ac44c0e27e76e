"""EngineLoop: the engine thread (engine_thread.py) as HTTP handlers (asyncio) use it. They queue commands for that
thread: a request (its outputs come back on its RequestStream, request_stream.py), an abort, a function to run there
(engine_call.py).

A structured-output request's grammar matcher is built on a grammar thread (`submit`) and the request is queued
once it is: its compile takes as long as the grammar is large (a JSON schema of 1,000 keys: ~30 ms over a 49k
vocabulary; 50,000 guided choices took ~1.5 s before the check refused lists past llguidance's limits), and on the
engine thread it held every running stream that long.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import PdlaunchError
from pdlaunch.http import JsonObject
from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.retry_later import OVERLOADED_RETRY_AFTER_S, RetryLater
from pdlaunch.kv_transfer.params import params_expired
from pdlaunch.kv_transfer.push_params import is_unsigned_push
from pdlaunch.server.engine_call import Call
from pdlaunch.server.engine_commands import Abort, Add
from pdlaunch.server.engine_thread import EngineThread, shutting_down
from pdlaunch.server.request_stream import RequestStream

if TYPE_CHECKING:  # the engine module pulls in torch and the model: built on the engine thread only
    from pdlaunch.engine.llm_engine import LLMEngine

log = logging.getLogger("pdlaunch.server")

T = TypeVar("T")
# The engine thread's wait between the steps of an engine whose requests wait for KV blocks that only a release frees
# (engine_thread.py): at most this late a release is found. At ~60 us an idle step, 500 polls a second cost ~3% of a
# core, where stepping at once spun one whole.
BLOCKED_WAIT_S = 0.002


class EngineLoop(EngineThread):
    """Owns the engine thread: what the HTTP side (event loop thread) calls. `engine_factory` runs on that thread
    (device binding stays there)."""

    def __init__(
        self,
        engine_factory: Callable[[], LLMEngine],
        max_pending_requests: int = 1024,
        idle_wait_s: float = 0.01,
        quiescent_wait_s: float = 0.5,
        on_fatal: Callable[[str], None] | None = None,
        blocked_wait_s: float = BLOCKED_WAIT_S,
        pending_limit_source: str | None = None,
    ) -> None:
        super().__init__(engine_factory, idle_wait_s, quiescent_wait_s, on_fatal, blocked_wait_s)
        self.max_pending_requests = max_pending_requests
        self.pending_limit_source = pending_limit_source  # what sets the limit, how to raise it: the 503 says it
        self._releases: set[asyncio.Task[bool]] = set()  # referenced until done, or the loop may drop them
        self._grammars = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")  # off the engine thread

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Block until the engine is built (or failed); False if it took longer than `timeout`."""
        return self._ready.wait(timeout)

    @property
    def engine(self) -> LLMEngine:
        """The engine, for reads of what does not change while it runs (tokenizer, max_model_len, ids);
        anything else goes through `call`. 503 while it is not built."""
        if self._engine is None:
            raise OpenAIError(503, f"engine is not ready (state: {self.state})", code="not_ready")
        return self._engine

    @property
    def built_engine(self) -> LLMEngine | None:
        """The engine once built (also after it failed or stopped: /info still shows what it was)."""
        return self._engine

    def require_ready(self) -> LLMEngine:
        """The engine when it serves requests, else the 503 a request gets."""
        if self.state != "ready":
            raise OpenAIError(503, f"engine is not ready (state: {self.state})", code="not_ready")
        return self.engine

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._streams)

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        kv_transfer_params: JsonObject | None = None,
    ) -> RequestStream:
        """Queue a request; outputs arrive on the returned stream's queue (first item: Accepted or error)."""
        engine = self.require_ready()
        try:  # here, not on the engine thread: a bad value fails this request before the engine sees it
            parsed = engine.check_kv_transfer_params(kv_transfer_params)
        except PdlaunchError as exc:
            raise OpenAIError(400, exc.render(), param=exc.field or "kv_transfer_params") from None
        expired = params_expired(kv_transfer_params, parsed)
        stream = RequestStream(request_id=request_id, loop=asyncio.get_running_loop(), prompt_recomputed=expired)
        add = Add(stream, prompt_token_ids, params, parsed, params_expired=expired)
        with self._lock:
            # Checked again under the lock: an engine thread that failed or stopped since require_ready has failed
            # the streams it knew (_fail_all, after setting the state), and one added now would wait forever.
            if self.state != "ready":
                raise OpenAIError(503, f"engine is not ready (state: {self.state})", code="not_ready")
            if request_id in self._streams:
                raise OpenAIError(409, f"request id {request_id!r} is already in flight", param="X-Request-Id")
            if len(self._streams) >= self.max_pending_requests:
                raise RetryLater(self._overloaded_message(), "overloaded", OVERLOADED_RETRY_AFTER_S)
            self._streams[request_id] = stream
            self._adds.add(add)
        spec = params.structured_output
        if spec is None:
            self._commands.put(add)
            return stream
        try:
            add.matcher = self._grammars.submit(engine.grammar_matcher, spec)
        except RuntimeError:  # the pool is shut down: the server is stopping
            with self._lock:
                self._streams.pop(request_id, None)
                self._adds.discard(add)
            raise shutting_down("the server is stopping") from None
        add.matcher.add_done_callback(lambda _: self._commands.put(add))  # queued once its grammar is built
        return stream

    def _overloaded_message(self) -> str:
        source = f" ({self.pending_limit_source})" if self.pending_limit_source else ""
        return (f"server overloaded: {len(self._streams)} requests pending, this instance's limit of "
                f"{self.max_pending_requests}{source}; retry with backoff (a longer wait after each 503) or send fewer "
                "requests at once")

    def abort(self, request_id: str) -> None:
        """Stop a request (client went away); its blocks are freed by the engine."""
        with self._lock:
            known = self._streams.pop(request_id, None) is not None
        if known:
            self._commands.put(Abort(request_id))

    async def call(self, fn: Callable[[LLMEngine], T], timeout: float = 30.0, what: str | None = None) -> T:
        """Run fn(engine) on the engine thread (for anything that must not race with step()). Past `timeout` the
        caller gets a 503 naming `what` (else fn's name), and a call the engine thread had not started yet is
        dropped: a /sleep that timed out must not put the instance to sleep later, unseen. A call the engine thread
        will not run (it failed or stopped) fails at once with the error its requests get."""
        call = Call(fn, what)
        with self._lock:  # as submit: an engine thread that ended has failed the calls it knew (_fail_all)
            if self.state in ("failed", "stopped"):
                raise OpenAIError(503, f"engine is not ready (state: {self.state})", code="not_ready")
            self._calls.add(call)
        self._commands.put(call)
        try:
            return await call.result(timeout)
        finally:
            with self._lock:
                self._calls.discard(call)

    async def release_held_kv(self, request_id: str, timeout: float = 10.0) -> bool:
        """Prefill: free the KV blocks held for a request whose decode leg will not run (the client
        went away after the prefill leg, or the decode refused the request), instead of keeping
        them for the whole kv_transfer.kv_lease_seconds.

        `request_id` is the engine's request id, which the prefill's answer carries as
        `kv_transfer_params.remote_request_id`. Usage from a route handler (authenticate first):
        `released = await engine_loop.release_held_kv(params["remote_request_id"])`.
        Returns True when the blocks are freed at the next engine step (or once a transfer still
        reading them ends), False when nothing is held for that id (never held, already sent,
        expired, or a decode is reading it now). Raises OpenAIError 503 when the engine is not
        ready or does not answer within `timeout` seconds."""
        self.require_ready()
        return await self.call(lambda engine: engine.release_held_kv(request_id), timeout,
                               f"the release of the KV held for {request_id!r}")

    async def release_held_kv_of_client(self, client_request_id: str, timeout: float = 10.0) -> int:
        """Prefill: release_held_kv for every request held for a prefill leg whose X-Request-Id was
        `client_request_id` (a proxy that never read the leg's answer). Returns how many it released."""
        self.require_ready()
        return await self.call(lambda engine: engine.release_held_kv_of_client(client_request_id), timeout,
                               f"the release of the KV held for client request {client_request_id!r}")

    async def forget_engine(self, engine_id: str, timeout: float = 10.0) -> int:
        """Drop what this instance's KV connector keeps of engine `engine_id`, which died (its launcher asks before
        it restarts it): its agents, whose mapping of its memory would keep that memory allocated. On the engine
        thread, like a release. Returns how many agents went; OpenAIError 503 when the engine is not ready or does
        not answer within `timeout` seconds."""
        self.require_ready()
        return await self.call(lambda engine: engine.forget_engine(engine_id), timeout,
                               f"forgetting the agents of engine {engine_id!r}")

    def release_held_kv_soon(self, request_id: str) -> None:
        """release_held_kv without waiting for it (fire and forget); a failure is logged (the engine is
        not ready: the lease frees the blocks later)."""
        task = asyncio.ensure_future(self.release_held_kv(request_id))
        self._releases.add(task)
        task.add_done_callback(_log_release_failure(request_id))
        task.add_done_callback(self._releases.discard)

    def release_unloaded_soon(self, request_id: str, kv_transfer_params: JsonObject,
                              prompt_token_ids: Callable[[], Awaitable[list[int]]]) -> None:
        """Decode: a PD decode request the server ended before it submitted it (its client left while its prompt was
        tokenized, or the server refused it): its prefill is told to drop its hold now, not at its lease's end
        (engine.release_unloaded, on the engine thread), without waiting. `prompt_token_ids` is awaited only for
        vLLM's push-proxy params, whose drop names the prompt. Params this engine refuses release nothing; a failure
        is logged (the lease frees the blocks)."""
        task = asyncio.ensure_future(self._release_unsubmitted(request_id, kv_transfer_params, prompt_token_ids))
        self._releases.add(task)
        task.add_done_callback(_log_release_failure(request_id))
        task.add_done_callback(self._releases.discard)

    async def _release_unsubmitted(self, request_id: str, kv_transfer_params: JsonObject,
                                   prompt_token_ids: Callable[[], Awaitable[list[int]]], timeout: float = 10.0
                                   ) -> bool:
        engine = self.require_ready()
        try:
            parsed = engine.check_kv_transfer_params(kv_transfer_params)
            ids = await prompt_token_ids() if is_unsigned_push(kv_transfer_params) else []
        except (PdlaunchError, OpenAIError):  # params of no hold here, or a prompt no prefill could have held
            return False
        if parsed is None:
            return False
        await self.call(lambda e: e.release_unloaded(request_id, ids, parsed), timeout,
                        f"telling the prefill to drop the KV held for {request_id!r}")
        return True

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._grammars.shutdown(wait=False, cancel_futures=True)
        self._commands.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("engine thread did not stop within %.0fs", timeout)


def _log_release_failure(request_id: str) -> Callable[[asyncio.Task[bool]], None]:
    def done(task: asyncio.Task[bool]) -> None:
        exc = None if task.cancelled() else task.exception()
        if isinstance(exc, OpenAIError):
            log.warning("could not release the KV held for %s now: %s", request_id, exc.message)
        elif exc is not None:
            log.error("releasing the KV held for %s failed: %s", request_id, exc)

    return done
