"""The engine thread: the only thread that touches the LLMEngine (it is not thread-safe).

HTTP handlers (asyncio) send commands through a thread-safe queue; the thread drains it before
every step, runs `step()`, and hands each request's outputs to that request's asyncio queue with
`loop.call_soon_threadsafe`. When nothing runs it blocks on the command queue for at most
`idle_wait_s` and then steps anyway: step() also polls KV transfers and leases. When the engine is
quiescent (nothing held, loading or draining either) it blocks for up to `quiescent_wait_s`: an idle
instance costs ~no CPU, and a command still wakes it at once.

A structured-output request's grammar matcher is built on a grammar thread (`submit`) and the request is queued
once it is: its compile takes as long as the grammar is large (50,000 guided choices: ~1.5 s), and on the engine
thread it held every running stream that long.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

from pdlaunch import metrics
from pdlaunch.engine.outputs import InstanceAsleep, RequestOutput, SamplingParams
from pdlaunch.errors import PdlaunchError
from pdlaunch.http import JsonObject
from pdlaunch.http.errors import OpenAIError
from pdlaunch.kv_transfer.params import KVTransferParams
from pdlaunch.server.recent_itl import RecentItl

if TYPE_CHECKING:  # the engine module pulls in torch and the model: built on the engine thread only
    from llguidance import LLMatcher

    from pdlaunch.engine.llm_engine import LLMEngine
    from pdlaunch.engine.stats import EngineStats

log = logging.getLogger("pdlaunch.server")

EngineState = Literal["loading", "ready", "failed", "stopped"]
CONNECTOR_INFO_REFRESH_S = 0.25  # /info's connector part (held and loading requests, peers) is this fresh
T = TypeVar("T")
V = TypeVar("V")


@dataclass
class Accepted:
    """First item of a request's queue once the engine took it."""

    num_prompt_tokens: int


StreamItem = Accepted | RequestOutput | OpenAIError


@dataclass
class RequestStream:
    """One request as the HTTP side sees it: an asyncio queue the engine thread feeds."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StreamItem] = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None
    # It asked for a remote prefill whose params had expired: the prompt is computed here (load_failure_policy
    # recompute), as when a load fails (RequestOutput.prompt_recomputed).
    prompt_recomputed: bool = False

    def put(self, item: StreamItem) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclass
class _Add:
    stream: RequestStream
    prompt_token_ids: list[int]
    params: SamplingParams
    kv_transfer_params: KVTransferParams | None  # parsed by the engine's boundary (submit)
    matcher: Future[LLMatcher] | None = None  # structured output: its grammar's matcher, built (submit)


@dataclass
class _Abort:
    request_id: str


@dataclass(eq=False)
class _Call:
    """Run fn(engine) on the engine thread; `run` hands its result or exception to the caller's future, `fail` an
    error instead (the engine thread ended before it ran the call)."""

    run: Callable[[LLMEngine], None]
    fail: Callable[[OpenAIError], None]


class EngineLoop:
    """Owns the engine thread. `engine_factory` runs on that thread (device binding stays there)."""

    def __init__(
        self,
        engine_factory: Callable[[], LLMEngine],
        max_pending_requests: int = 1024,
        idle_wait_s: float = 0.01,
        quiescent_wait_s: float = 0.5,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self._factory = engine_factory
        self.max_pending_requests = max_pending_requests
        self.idle_wait_s = idle_wait_s
        self.quiescent_wait_s = quiescent_wait_s
        self._on_fatal = on_fatal
        self._commands: queue.Queue[_Add | _Abort | _Call | None] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._calls: set[_Call] = set()  # queued, not started: failed with the streams when the engine thread ends
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._engine: LLMEngine | None = None
        self.state: EngineState = "loading"
        self.error: str | None = None
        self.stats: EngineStats | None = None  # the engine's after its last step
        # What /info shows of the engine, read on the engine thread so that /info never waits for it (a step, or a
        # sleep or wake_up of up to two minutes): the TP ranks' engine ids and nodes once it is built (fixed from
        # then on; [] when the executor does not know them), the KV connector's description as steps run.
        self.rank_engine_ids: list[str] = []
        self.rank_nodes: list[str] = []
        self.connector_info: JsonObject = {}
        self._connector_info_at = float("-inf")  # time.monotonic() of its last refresh
        self.num_aborted = 0  # requests stopped before they finished (client went away): _count_abort
        self.recent_itl = RecentItl()  # /health's itl_ms
        self._releases: set[asyncio.Task[bool]] = set()  # referenced until done, or the loop may drop them
        self._grammars = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")  # off the engine thread

    # -- HTTP side (event loop thread) ------------------------------------------------------------
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
        remote_prefill = (kv_transfer_params or {}).get("do_remote_prefill") not in (None, False)
        stream = RequestStream(request_id=request_id, loop=asyncio.get_running_loop(),
                               prompt_recomputed=remote_prefill and parsed is None)
        with self._lock:
            # Checked again under the lock: an engine thread that failed or stopped since require_ready has failed
            # the streams it knew (_fail_all, after setting the state), and one added now would wait forever.
            if self.state != "ready":
                raise OpenAIError(503, f"engine is not ready (state: {self.state})", code="not_ready")
            if request_id in self._streams:
                raise OpenAIError(409, f"request id {request_id!r} is already in flight", param="X-Request-Id")
            if len(self._streams) >= self.max_pending_requests:
                raise OpenAIError(
                    503, f"server overloaded: {len(self._streams)} requests pending "
                    f"(limit {self.max_pending_requests}); retry later", code="overloaded")
            self._streams[request_id] = stream
        add = _Add(stream, prompt_token_ids, params, parsed)
        spec = params.structured_output
        if spec is None:
            self._commands.put(add)
            return stream
        try:
            add.matcher = self._grammars.submit(engine.grammar_matcher, spec)
        except RuntimeError:  # the pool is shut down: the server is stopping
            with self._lock:
                self._streams.pop(request_id, None)
            raise OpenAIError(503, "the server is stopping", code="shutting_down") from None
        add.matcher.add_done_callback(lambda _: self._commands.put(add))  # queued once its grammar is built
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request (client went away); its blocks are freed by the engine."""
        with self._lock:
            known = self._streams.pop(request_id, None) is not None
        if known:
            self._commands.put(_Abort(request_id))

    async def call(self, fn: Callable[[LLMEngine], T], timeout: float = 30.0, what: str | None = None) -> T:
        """Run fn(engine) on the engine thread (for anything that must not race with step()). Past `timeout` the
        caller gets a 503 naming `what` (else fn's name), and a call the engine thread had not started yet is
        dropped: a /sleep that timed out must not put the instance to sleep later, unseen. A call the engine thread
        will not run (it failed or stopped) fails at once with the error its requests get."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        name = what or getattr(fn, "__name__", "a call")
        state = {"started": False, "abandoned": False}
        lock = threading.Lock()

        def run(engine: LLMEngine) -> None:
            with lock:
                if state["abandoned"]:
                    return
                state["started"] = True
            try:
                result = fn(engine)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                _settle(loop, _fail, future, exc)
            else:
                _settle(loop, _resolve, future, result)

        call = _Call(run, lambda error: _settle(loop, _fail, future, _copy(error)))
        with self._lock:  # as submit: an engine thread that ended has failed the calls it knew (_fail_all)
            if self.state in ("failed", "stopped"):
                raise OpenAIError(503, f"engine is not ready (state: {self.state})", code="not_ready")
            self._calls.add(call)
        self._commands.put(call)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            with lock:
                state["abandoned"] = True
                started = state["started"]
            status = "it still runs there" if started else \
                "it had not started (a step held the thread) and will not run"
            raise OpenAIError(503, f"engine thread did not finish {name} within {timeout:g}s; {status}") from None
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

    def release_held_kv_soon(self, request_id: str) -> None:
        """release_held_kv without waiting for it (fire and forget); a failure is logged (the engine is
        not ready: the lease frees the blocks later)."""
        task = asyncio.ensure_future(self.release_held_kv(request_id))
        self._releases.add(task)
        task.add_done_callback(_log_release_failure(request_id))
        task.add_done_callback(self._releases.discard)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._grammars.shutdown(wait=False, cancel_futures=True)
        self._commands.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("engine thread did not stop within %.0fs", timeout)

    # -- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            engine = self._engine = self._factory()
        except Exception as exc:  # noqa: BLE001 - any build failure ends the instance with its message
            self._fatal(f"engine failed to start: {exc}", exc)
            self._ready.set()
            return
        # /info and the gauges have numbers from the start: a quiescent loop steps first quiescent_wait_s later
        self.rank_engine_ids, self.rank_nodes = engine.rank_engine_ids, engine.rank_nodes
        self._update_stats(engine)
        self.state = "ready"
        self._ready.set()
        log.info("engine ready")
        busy = False
        try:
            while not self._stop.is_set():
                wait = 0.0 if busy else self.quiescent_wait_s if engine.is_quiescent() else self.idle_wait_s
                self._drain_commands(engine, wait)
                if self._stop.is_set():
                    break
                self._dispatch(engine.step())
                self._update_stats(engine)
                was_busy, busy = busy, engine.has_unfinished_requests()
                if was_busy and not busy:
                    self._check_integrity(engine)
        except Exception as exc:  # noqa: BLE001 - a crashed engine fails every request and the instance
            self._fatal(f"engine step failed: {exc}", exc)
            return
        finally:
            if self.state == "ready":  # not failed by _fatal
                self.state = "stopped"
            self._fail_all(OpenAIError(503, "server is shutting down", code="shutting_down"))
            self._shutdown_engine(engine)

    def _drain_commands(self, engine: LLMEngine, wait: float) -> None:
        """Run the queued commands; with none queued, wait up to `wait` seconds for the first."""
        try:
            command = self._commands.get(timeout=wait) if wait > 0 else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:  # None: the stop sentinel
            if isinstance(command, _Add):
                self._add(engine, command)
            elif isinstance(command, _Abort):
                self._abort(engine, command.request_id)
            else:
                with self._lock:
                    self._calls.discard(command)  # started: its own outcome settles it
                command.run(engine)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _abort(self, engine: LLMEngine, request_id: str) -> None:
        try:
            if engine.abort_request(request_id) is not None:
                self._count_abort()
        except Exception:  # a request not running here is None, not this: its blocks may not have come back
            log.exception("aborting request %s failed; the instance goes on serving the others", request_id)

    def _count_abort(self) -> None:
        """A request stopped before it finished (its client left, or another choice of its HTTP request failed):
        /info's num_aborted_requests and vllm:request_success{finished_reason="abort"}, once per engine request as
        vLLM counts each of its requests (a choice of n > 1 too), as stop and length are."""
        self.num_aborted += 1
        metrics.vllm(metrics.REQUEST_SUCCESS, finished_reason="abort").inc()

    def _add(self, engine: LLMEngine, command: _Add) -> None:
        stream = command.stream
        with self._lock:
            if self._streams.get(stream.request_id) is not stream:
                self._count_abort()  # aborted before the engine saw it (e.g. while its grammar was built)
                return
        prompt_ids = command.prompt_token_ids
        if command.matcher is not None and command.matcher.cancelled():  # stop() cancelled its build
            self._finish(stream.request_id, OpenAIError(503, "server is shutting down", code="shutting_down"))
            return
        try:
            matcher = command.matcher.result() if command.matcher is not None else None  # done: it queued this
            engine.add_request(stream.request_id, prompt_ids, command.params, command.kv_transfer_params, matcher)
        except InstanceAsleep:  # a /sleep ran while it was queued (admission had found the instance awake)
            self._finish(stream.request_id, OpenAIError(503, "instance is sleeping; POST /wake_up first",
                                                        code="sleeping"))
            return
        except PdlaunchError as exc:  # its hint says how to fix the request: it goes to the client too
            message = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
            self._finish(stream.request_id, OpenAIError(400, message, param=exc.field or "prompt"))
            return
        except Exception as exc:  # noqa: BLE001 - this request fails, the engine serves on
            log.exception("adding request %s failed", stream.request_id)
            self._finish(stream.request_id, OpenAIError(500, f"could not add the request: {exc}"))
            return
        stream.put(Accepted(num_prompt_tokens=len(prompt_ids)))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        gap_seconds, gap_tokens = 0.0, 0
        for out in outputs:
            with self._lock:
                stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted: the client is gone
            if out.new_token_ids:
                if stream.last_token_time is None:
                    metrics.TIME_TO_FIRST_TOKEN.observe(now - stream.arrival)
                else:
                    elapsed, count = now - stream.last_token_time, len(out.new_token_ids)
                    for _ in out.new_token_ids:
                        metrics.INTER_TOKEN_LATENCY.observe(elapsed / count)
                    gap_seconds += elapsed
                    gap_tokens += count
                stream.last_token_time = now
            if out.finished:
                self._finish(out.request_id, out)
            else:
                stream.put(out)
        if gap_tokens:
            self.recent_itl.add(now, gap_seconds, gap_tokens)

    def _finish(self, request_id: str, item: StreamItem) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(item)

    def _fail_all(self, error: OpenAIError) -> None:
        """Every request and every call not started gets `error` (the engine thread ended: none would be answered)."""
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            calls, self._calls = list(self._calls), set()
        for stream in streams:
            stream.put(error)
        for call in calls:
            call.fail(error)

    def _update_stats(self, engine: LLMEngine) -> None:
        """/info's stats and connector description. The running, waiting and KV-usage gauges are the engine's own, set
        as each step ends (engine/stats.update_metrics), not set again here from these stats."""
        stats = self.stats = engine.stats()
        metrics.KV_BLOCKS_TOTAL.set(stats["num_blocks_total"])
        now = time.monotonic()
        if now - self._connector_info_at >= CONNECTOR_INFO_REFRESH_S:
            self._connector_info_at = now
            connector = engine.connector
            self.connector_info = connector.info() if connector is not None else {}

    def _check_integrity(self, engine: LLMEngine) -> None:
        try:
            engine.check_integrity()
        except Exception as exc:  # noqa: BLE001 - a leak is logged loudly, serving goes on
            log.error("KV block integrity check failed after the engine went idle: %s", exc)

    def _fatal(self, message: str, exc: BaseException) -> None:
        self.state = "failed"
        self.error = message
        # A PdlaunchError is a user-facing problem: its message says it all, no traceback.
        log.error("%s", message, exc_info=None if isinstance(exc, PdlaunchError) else exc)
        self._fail_all(OpenAIError(500, message, code="engine_failed"))
        if self._on_fatal is not None:
            self._on_fatal(message)

    def _shutdown_engine(self, engine: LLMEngine) -> None:
        try:
            engine.shutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.warning("engine shutdown raised: %s", exc)


def _log_release_failure(request_id: str) -> Callable[[asyncio.Task[bool]], None]:
    def done(task: asyncio.Task[bool]) -> None:
        exc = None if task.cancelled() else task.exception()
        if isinstance(exc, OpenAIError):
            log.warning("could not release the KV held for %s now: %s", request_id, exc.message)
        elif exc is not None:
            log.error("releasing the KV held for %s failed: %s", request_id, exc)

    return done


def _settle(loop: asyncio.AbstractEventLoop, settle: Callable[[asyncio.Future[T], V], None],
            future: asyncio.Future[T], value: V) -> None:
    """`settle(future, value)` on the future's event loop, from any thread (nothing once that loop is closed)."""
    try:
        loop.call_soon_threadsafe(settle, future, value)
    except RuntimeError:  # the event loop is closed: nobody waits for the call any more
        pass


def _copy(error: OpenAIError) -> OpenAIError:
    """A fresh exception per caller: each raise writes its own traceback into the one it raises."""
    return OpenAIError(error.status, error.message, param=error.param, code=error.code)


def _resolve(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[T], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
