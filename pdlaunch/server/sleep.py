"""`/sleep`, `/wake_up`, `/is_sleeping`: engine sleep control (CuMem pools, docs/ARCHITECTURE.md "CuMem and sleep").

Refused with a 400 naming the fix unless the deployment enables sleep mode; the engine calls
(`sleep(level)`, `wake_up(tags)`, `is_sleeping()`) run on the engine thread. A sleeping instance
answers /health with 503, so the proxy routes nothing to it until it wakes. The engine's part is
EngineSleep (engine/sleep_mode.py), the memory's MemorySleep (memory/sleep.py).

`Instance.sleeping` is set on the engine thread, from the engine, when a sleep, wake_up or is_sleeping call ends,
however it ends, never by a route once its call returned (a sleep may have run since): one that raised may have
changed part of the memory, and one whose caller gave up at its timeout (a 503) may still finish later; either way
/health and request admission follow the engine, not the last answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from fastapi import Query, Request

from pdlaunch.errors import PdlaunchError
from pdlaunch.http import JsonObject
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.instance import Handler, Instance, SleepTransition, instance_of

if TYPE_CHECKING:
    from pdlaunch.engine.llm_engine import LLMEngine

SLEEP_CALL_TIMEOUT_S = 120.0  # level 1 copies every weight to host memory; level-2 wake reloads the checkpoint
TAGS = ("weights", "kv_cache")
T = TypeVar("T")


async def sleep(request: Request, level: str = Query("1")) -> JsonObject:
    instance = _sleep_mode(request)
    level_number = _level(level)
    pending = instance.engine_loop.num_pending
    if pending:
        raise OpenAIError(409, f"{pending} request(s) in flight; sleep when idle", code="busy")
    result = await _on_engine(instance, _noting_state(instance, "falling_asleep", lambda e: e.sleep(level_number)),
                              f"sleep (level {level_number})")
    return {"is_sleeping": instance.sleeping, **result.model_dump()}


async def wake_up(request: Request, tags: list[str] | None = Query(None)) -> JsonObject:
    instance = _sleep_mode(request)
    wanted = [t for item in tags or [] for t in item.split(",") if t]  # ?tags=a&tags=b or ?tags=a,b
    unknown = sorted(set(wanted) - set(TAGS))
    if unknown:
        raise OpenAIError(400, f"unknown tags {unknown}; use weights and/or kv_cache", param="tags")
    result = await _on_engine(instance, _noting_state(instance, "waking_up", lambda e: e.wake_up(wanted or None)),
                              f"wake_up ({', '.join(wanted or TAGS)})")
    return {**result.model_dump(), "is_sleeping": instance.sleeping}


async def is_sleeping(request: Request) -> JsonObject:
    instance = instance_of(request)
    if not instance.config.model.enable_sleep_mode:  # as vLLM answers: an instance that cannot sleep is not sleeping
        return {"is_sleeping": False}
    return {"is_sleeping": await _on_engine(instance, lambda e: _note_sleeping(instance, e), "is_sleeping")}


def _level(text: str) -> int:
    """?level= as sent: 1 or 2, else a 400 naming the query parameter (not pydantic's `query.level`) and both
    levels."""
    try:
        level = int(text)
    except ValueError:
        level = 0
    if level not in (1, 2):
        raise OpenAIError(400, f"level must be 1 (keep weights in host memory) or 2 (discard all), got {text!r}",
                          param="level")
    return level


def _sleep_mode(request: Request) -> Instance:
    instance = instance_of(request)
    if not instance.config.model.enable_sleep_mode:
        raise OpenAIError(400, "sleep mode is not enabled on this instance (start it with --enable-sleep-mode)",
                          param="enable_sleep_mode", code="sleep_mode_disabled")
    return instance


def _note_sleeping(instance: Instance, engine: LLMEngine) -> bool:
    """The engine's sleep state into `instance.sleeping`, on the engine thread, ordered with its sleeps and wake_ups:
    written by the route once the call returned, an answer taken before a sleep that ran meanwhile would mark the
    sleeping instance awake (/health ok, requests admitted) until the next call."""
    instance.sleeping = engine.is_sleeping()
    return instance.sleeping


def _noting_state(instance: Instance, transition: SleepTransition,
                  fn: Callable[[LLMEngine], T]) -> Callable[[LLMEngine], T]:
    """`fn` (a sleep or wake_up, `transition` while it runs: /info says so), then the engine's own sleep state into
    `instance.sleeping`, on the engine thread: also when `fn` raised, and when the route stopped waiting for it (the
    route's timeout)."""
    def run(engine: LLMEngine) -> T:
        instance.sleep_transition = transition
        try:
            return fn(engine)
        finally:
            _note_sleeping(instance, engine)
            instance.sleep_transition = None

    return run


async def _on_engine(instance: Instance, fn: Callable[[LLMEngine], T], what: str) -> T:
    instance.engine_loop.require_ready()  # 503 while the engine loads
    try:
        return await instance.engine_loop.call(fn, timeout=SLEEP_CALL_TIMEOUT_S, what=what)
    except PdlaunchError as exc:
        raise OpenAIError(400, exc.render(), param=exc.field, code="sleep_failed") from None


ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/sleep", sleep), ("POST", "/wake_up", wake_up), ("GET", "/is_sleeping", is_sleeping)]
