"""The engine thread: the only thread that touches the LLMEngine (it is not thread-safe).

HTTP handlers (asyncio) send commands through a thread-safe queue (engine_loop.py); the thread drains it before
every step, runs `step()`, and hands each request's outputs to that request's asyncio queue with
`loop.call_soon_threadsafe`. When nothing runs it blocks on the command queue for at most
`idle_wait_s` and then steps anyway: step() also polls KV transfers and leases. When the engine is
quiescent (nothing held, loading or draining either) it blocks for up to `quiescent_wait_s`: an idle
instance costs ~no CPU, and a command still wakes it at once. When its requests wait for KV blocks that only a
release frees (`LLMEngine.is_blocked`), up to `blocked_wait_s`: stepping at once spun a core on the same step.

vLLM's counts of what the engine did are taken here, as its outputs come, whether or not a client reads them
(engine_counts.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from pdlaunch.engine.outputs import InstanceAsleep, RequestOutput
from pdlaunch.errors import PdlaunchError
from pdlaunch.http import JsonObject
from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.shutdown_answer import shutting_down as shutting_down  # engine_loop.py imports it from here
from pdlaunch.metrics.instance import (
    INTER_TOKEN_LATENCY,
    KV_BLOCKS_TOTAL,
    KV_INTEGRITY_CHECKS,
    KV_INTEGRITY_FAILURES,
    TIME_TO_FIRST_TOKEN,
)
from pdlaunch.metrics.kv_transfer import count_expired_recompute
from pdlaunch.server.engine_call import Call, copy_error
from pdlaunch.server.engine_commands import Abort, Add, Command
from pdlaunch.server.engine_counts import EngineCounts, add_generated
from pdlaunch.server.idle_check import IdleCheck
from pdlaunch.server.recent_itl import RecentItl
from pdlaunch.server.request_stream import Accepted, RequestStream, StreamItem

if TYPE_CHECKING:  # the engine module pulls in torch and the model: built on the engine thread only
    from pdlaunch.engine.llm_engine import LLMEngine
    from pdlaunch.engine.stats import EngineStats

log = logging.getLogger("pdlaunch.server")

EngineState = Literal["loading", "ready", "failed", "stopped"]
# The engine stops once uvicorn's graceful drain at shutdown has ended (the app's lifespan), so a request it cuts has
# no drain time left to wait for: its 503 shutting_down (http/shutdown_answer.py) has the same Retry-After as those the
# drain's end cuts, and the client retries at once, on a running instance (through the proxy, another one of the role,
# or this one restarted).
ENGINE_STOPPED = "server is shutting down"

CONNECTOR_INFO_REFRESH_S = 0.25  # /info's connector part (held and loading requests, peers) is this fresh


class EngineThread:
    """The engine thread and what it runs; EngineLoop (engine_loop.py) adds what the HTTP side calls.
    `engine_factory` runs on that thread (device binding stays there)."""

    def __init__(
        self,
        engine_factory: Callable[[], LLMEngine],
        idle_wait_s: float,
        quiescent_wait_s: float,
        on_fatal: Callable[[str], None] | None,
        blocked_wait_s: float,
    ) -> None:
        self._factory = engine_factory
        self.idle_wait_s, self.quiescent_wait_s, self.blocked_wait_s = idle_wait_s, quiescent_wait_s, blocked_wait_s
        self._on_fatal = on_fatal
        self._commands: queue.Queue[Command] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        # submitted, not yet taken by the engine thread (queued, or its grammar builds): aborts if it stops first
        self._adds: set[Add] = set()
        self.counts = EngineCounts()  # the engine thread's own
        # queued, not started: failed with the streams when the engine thread ends
        self._calls: set[Call[object]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._engine: LLMEngine | None = None
        self._idle_check = IdleCheck()  # when the KV block integrity check runs
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
        self.recent_itl = RecentItl()  # /health's itl_ms

    @property
    def num_aborted(self) -> int:
        """Requests stopped before they finished (client went away, shutdown, engine failure): /info's
        num_aborted_requests."""
        return self.counts.num_aborted

    def _run(self) -> None:
        try:
            engine = self._engine = self._factory()
            # /info and the gauges have numbers from the start: a quiescent loop steps first quiescent_wait_s later
            self.rank_engine_ids, self.rank_nodes = engine.rank_engine_ids, engine.rank_nodes
            self._update_stats(engine)
        except Exception as exc:  # noqa: BLE001 - any build failure ends the instance with its message, never "loading"
            self._fatal(f"engine failed to start: {exc}", exc)
            self._ready.set()
            if self._engine is not None:  # built, its first stats failed: its memory and agent go back
                self._shutdown_engine(self._engine)
            return
        self.state = "ready"
        self._ready.set()
        log.info("engine ready")
        busy = False
        check = self._idle_check
        try:
            while not self._stop.is_set():
                # busy: a new request may still join the next step while the device has work (engine/arrival_window.py);
                # blocked: a command (abort, release_held_kv) or the next step's poll of the connector frees blocks
                wait = (self.blocked_wait_s if engine.is_blocked() else engine.arrival_window_s()) if busy else \
                    self.quiescent_wait_s if engine.is_quiescent() else self.idle_wait_s
                self._drain_commands(engine, min(wait, check.due_in(time.monotonic())))
                if self._stop.is_set():
                    break
                self._dispatch(engine.step())
                self._update_stats(engine)
                busy = engine.has_unfinished_requests()
                if check.after_step(busy, time.monotonic()) and self._commands.empty():
                    check.ran(time.monotonic())
                    self._check_integrity(engine)
        except Exception as exc:  # noqa: BLE001 - a crashed engine fails every request and the instance
            self._fatal(f"engine step failed: {exc}", exc)
            return
        finally:
            if self.state == "ready":  # not failed by _fatal
                self.state = "stopped"
                self._abort_open(engine)
            self._fail_all(shutting_down(ENGINE_STOPPED))
            self._shutdown_engine(engine)

    def _drain_commands(self, engine: LLMEngine, wait: float) -> None:
        """Run the queued commands; with none queued, wait up to `wait` seconds for the first."""
        try:
            command = self._commands.get(timeout=wait) if wait > 0 else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:  # None: the stop sentinel
            if isinstance(command, Add):
                self._add(engine, command)
            elif isinstance(command, Abort):
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
            out = engine.abort_request(request_id)
        except Exception:  # a request not running here is None, not this: its blocks may not have come back
            log.exception("aborting request %s failed; the instance goes on serving the others", request_id)
            return
        if out is not None:
            add_generated(self.counts.counted(out))

    def _abort_open(self, engine: LLMEngine) -> None:
        """The engine thread stops: every request still open ends as an abort, counted once; those the engine holds
        are aborted here (engine.shutdown would), the rest only counted (_count_open). A PD decode its prefill's first
        token ended at admission has its output still in the engine (the next step would hand it out): handed out
        first, it is answered and counted as it ended."""
        try:
            self._dispatch(engine.take_admitted())
        except Exception:  # noqa: BLE001 - they end as aborts below; the stop goes on
            log.exception("handing out the outputs of requests admitted with their first token failed")
        for request_id in list(self.counts.running):
            self._abort(engine, request_id)
        self._count_open()

    def _count_open(self) -> None:
        """Every request still open ends as an abort, counted once: those the engine took whose end it did not hand
        out, and those it never took (queued, or their grammar still built). Called once the state left "ready"."""
        self.counts.abort_running()
        with self._lock:  # the state is no longer "ready": no submit adds one now
            adds, self._adds = self._adds, set()
        for _ in adds:
            self.counts.count_abort()

    def _add(self, engine: LLMEngine, command: Add) -> None:
        stream = command.stream
        with self._lock:
            self._adds.discard(command)  # taken: counted below if it is an abort
            current = self._streams.get(stream.request_id)
            if current is not stream:
                self.counts.count_abort()  # aborted before the engine saw it (e.g. while its grammar was built)
        if current is not stream:
            if current is None:  # else a later request of that id is on its way here, maybe with the same params
                self._release_unloaded(engine, command)
            return
        prompt_ids = command.prompt_token_ids
        if command.matcher is not None and command.matcher.cancelled():  # stop() cancelled its build
            # Not released: the instance stops, and a proxy may send the same leg to another decode (as after a
            # sleep's refusal, engine_requests.py).
            self.counts.count_abort()
            self._finish(stream.request_id, shutting_down(ENGINE_STOPPED))
            return
        try:
            try:
                matcher = command.matcher.result() if command.matcher is not None else None  # done: it queued this
            except Exception:
                self._release_unloaded(engine, command)  # its grammar is refused: add_request never sees it
                raise
            engine.add_request(stream.request_id, prompt_ids, command.params, command.kv_transfer_params, matcher)
            if command.params_expired:  # queued: it computes its prompt here (not counted where it was refused)
                count_expired_recompute(stream.request_id)
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
        self.counts.started(stream.request_id)
        self._idle_check.added()  # (one that ends within its first step never shows as busy)
        stream.put(Accepted(num_prompt_tokens=len(prompt_ids)))

    @staticmethod
    def _release_unloaded(engine: LLMEngine, command: Add) -> None:
        """A PD decode request ends here before engine.add_request took it: its prefill is told to drop its hold of
        the prompt's KV now (engine.release_unloaded), not at its lease's end (kv_transfer.kv_lease_seconds)."""
        if command.kv_transfer_params is None:
            return
        try:
            engine.release_unloaded(command.stream.request_id, command.prompt_token_ids, command.kv_transfer_params)
        except Exception:  # noqa: BLE001 - the lease frees the blocks; the engine serves on
            log.exception("telling the prefill to drop the KV held for request %s failed", command.stream.request_id)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        gap_seconds, gap_tokens, generated = 0.0, 0, 0
        for out in outputs:
            generated += self.counts.counted(out)
            with self._lock:
                stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted: the client is gone
            if out.new_token_ids:
                if stream.last_token_time is None:
                    TIME_TO_FIRST_TOKEN.observe(now - stream.arrival)
                else:
                    elapsed, count = now - stream.last_token_time, len(out.new_token_ids)
                    for _ in out.new_token_ids:
                        INTER_TOKEN_LATENCY.observe(elapsed / count)
                    gap_seconds += elapsed
                    gap_tokens += count
                stream.last_token_time = now
            if out.finished:
                self._finish(out.request_id, out)
            else:
                stream.put(out)
        if gap_tokens:
            self.recent_itl.add(now, gap_seconds, gap_tokens)
        add_generated(generated)

    def _finish(self, request_id: str, item: StreamItem) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(item)

    def _fail_all(self, error: OpenAIError) -> None:
        """Every request and every call not started gets a copy of `error` of its own (the engine thread ended: none
        would be answered; one exception raised by every handler grew one traceback with all their frames)."""
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            calls, self._calls = list(self._calls), set()
        for stream in streams:
            stream.put(copy_error(error))
        for call in calls:
            call.fail(error)

    def _update_stats(self, engine: LLMEngine) -> None:
        """/info's stats and connector description. The running, waiting and KV-usage gauges are the engine's own, set
        as each step ends (engine/stats.update_metrics), not set again here from these stats."""
        stats = self.stats = engine.stats()
        KV_BLOCKS_TOTAL.set(stats["num_blocks_total"])
        now = time.monotonic()
        if now - self._connector_info_at >= CONNECTOR_INFO_REFRESH_S:
            self._connector_info_at = now
            connector = engine.connector
            self.connector_info = connector.info() if connector is not None else {}

    def _check_integrity(self, engine: LLMEngine) -> None:
        try:
            engine.check_integrity()
        except Exception as exc:  # noqa: BLE001 - a leak is logged loudly, serving goes on
            KV_INTEGRITY_FAILURES.inc()
            log.error("KV block integrity check failed after the engine went idle: %s", exc)
        finally:
            KV_INTEGRITY_CHECKS.inc()

    def _fatal(self, message: str, exc: BaseException) -> None:
        self.state = "failed"
        self.error = message
        # A PdlaunchError is a user-facing problem: its message says it all, no traceback.
        log.error("%s", message, exc_info=None if isinstance(exc, PdlaunchError) else exc)
        # Its open requests end as aborts (vLLM's count of a request ended neither by stop nor length), counted before
        # their clients get the error; the failed engine is not asked to abort them (its shutdown frees them).
        self._count_open()
        self._fail_all(OpenAIError(500, message, code="engine_failed"))
        if self._on_fatal is not None:
            self._on_fatal(message)

    def _shutdown_engine(self, engine: LLMEngine) -> None:
        try:
            engine.shutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.warning("engine shutdown raised: %s", exc)
