"""A function run on the engine thread for a caller on an event loop (EngineLoop.call): its result or exception
goes back to the caller's loop; past the caller's timeout, or once the caller is cancelled, a call the engine thread
had not started is dropped."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.retry_later import RetryLater

if TYPE_CHECKING:  # the engine module pulls in torch and the model: built on the engine thread only
    from pdlaunch.engine.llm_engine import LLMEngine

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)  # a Call[int] waits in the engine thread's set of Call[object]
V = TypeVar("V")


class Call(Generic[T_co]):
    """Run fn(engine) on the engine thread; `run` hands its result or exception to the caller's future, `fail` an
    error instead (the engine thread ended before it ran the call). Built on the caller's event loop; a timeout
    names it `what`, else fn's name."""

    def __init__(self, fn: Callable[[LLMEngine], T_co], what: str | None) -> None:
        self._fn = fn
        self._name = what or getattr(fn, "__name__", "a call")
        self._loop = asyncio.get_running_loop()
        self._future: asyncio.Future[T_co] = self._loop.create_future()
        self._lock = threading.Lock()
        self._started = False
        self._abandoned = False

    def run(self, engine: LLMEngine) -> None:
        with self._lock:
            if self._abandoned:
                return
            self._started = True
        try:
            result = self._fn(engine)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            _settle(self._loop, _fail, self._future, exc)
        else:
            _settle(self._loop, _resolve, self._future, result)

    def fail(self, error: OpenAIError) -> None:
        _settle(self._loop, _fail, self._future, copy_error(error))

    async def result(self, timeout: float) -> T_co:
        """fn's result (or its exception). Past `timeout` a 503 naming the call, and a call the engine thread had not
        started yet is dropped: a /sleep that timed out must not put the instance to sleep later, unseen. So is one
        whose caller is cancelled (its request cut at shutdown, its client gone): nobody would see it run."""
        try:
            return await asyncio.wait_for(self._future, timeout)
        except asyncio.CancelledError:
            self._abandon()
            raise
        except asyncio.TimeoutError:
            started = self._abandon()
            status = "it still runs there" if started else \
                "it had not started (a step held the thread) and will not run"
            raise OpenAIError(503, f"engine thread did not finish {self._name} within {timeout:g}s; {status}") from None

    def _abandon(self) -> bool:
        """Nobody waits for the call any more: the engine thread skips it unless it has started it (returned)."""
        with self._lock:
            self._abandoned = True
            return self._started


def _settle(loop: asyncio.AbstractEventLoop, settle: Callable[[asyncio.Future[T], V], None],
            future: asyncio.Future[T], value: V) -> None:
    """`settle(future, value)` on the future's event loop, from any thread (nothing once that loop is closed)."""
    try:
        loop.call_soon_threadsafe(settle, future, value)
    except RuntimeError:  # the event loop is closed: nobody waits for the call any more
        pass


def copy_error(error: OpenAIError) -> OpenAIError:
    """A fresh exception per caller or request stream (each raise appends its frames to the traceback of the one it
    raises), of the same kind: the 503 shutting_down of a stopping engine keeps its Retry-After."""
    if isinstance(error, RetryLater):
        return RetryLater(error.message, code=error.code or "", retry_after_s=error.retry_after_s)
    return OpenAIError(error.status, error.message, param=error.param, code=error.code)


def _resolve(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[T], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
