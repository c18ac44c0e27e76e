"""`/sleep`, `/wake_up`, `/is_sleeping`: engine sleep control (CuMem pools, docs/ARCHITECTURE.md "CuMem and sleep").

Refused with a 400 naming the fix unless the deployment enables sleep mode and the engine offers
`sleep(level)`, `wake_up(tags)` and `is_sleeping()`; the engine calls run on the engine thread.
A sleeping instance answers /health with 503, so the proxy routes nothing to it until it wakes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Query

from pdlaunch.config.models import DeploymentConfig
from pdlaunch.errors import PdlaunchError
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.engine_loop import EngineLoop

SLEEP_CALL_TIMEOUT_S = 120.0  # level 1 copies every weight to host memory; level-2 wake reloads the checkpoint
TAGS = ("weights", "kv_cache")


def _as_dict(result: Any) -> dict[str, Any]:
    return result.model_dump() if hasattr(result, "model_dump") else {}


class SleepRoutes:
    """The HTTP layer of sleep for one instance; the engine's part is EngineSleep (engine/sleep_mode.py),
    the memory's MemorySleep (memory/sleep.py)."""

    def __init__(self, engine_loop: EngineLoop, config: DeploymentConfig) -> None:
        self._loop = engine_loop
        self._enabled = config.model.enable_sleep_mode
        self.sleeping = False

    def _check_supported(self) -> None:
        if not self._enabled:
            raise OpenAIError(400, "sleep mode is not enabled on this instance (start it with --enable-sleep-mode)",
                              param="enable_sleep_mode", code="sleep_mode_disabled")
        engine = self._loop.engine
        if engine is None or not all(hasattr(engine, name) for name in ("sleep", "wake_up", "is_sleeping")):
            raise OpenAIError(400, "sleep mode is not supported by this engine on this platform",
                              param="enable_sleep_mode", code="sleep_mode_unsupported")

    async def _engine(self, fn: Callable[[Any], Any]) -> Any:
        try:
            return await self._loop.call(fn, timeout=SLEEP_CALL_TIMEOUT_S)
        except PdlaunchError as exc:
            raise OpenAIError(400, exc.render(), param=exc.field, code="sleep_failed") from None

    async def sleep(self, level: int) -> dict[str, Any]:
        self._check_supported()
        if level not in (1, 2):
            raise OpenAIError(400, "level must be 1 (keep weights in host memory) or 2 (discard all)",
                              param="level")
        if self._loop.num_pending:
            raise OpenAIError(409, f"{self._loop.num_pending} request(s) in flight; sleep when idle", code="busy")
        result = await self._engine(lambda e: e.sleep(level))
        self.sleeping = True
        return {"is_sleeping": True, **_as_dict(result)}

    async def wake_up(self, tags: list[str] | None) -> dict[str, Any]:
        self._check_supported()
        wanted = [t for item in tags or [] for t in item.split(",") if t]  # ?tags=a&tags=b or ?tags=a,b
        unknown = sorted(set(wanted) - set(TAGS))
        if unknown:
            raise OpenAIError(400, f"unknown tags {unknown}; use weights and/or kv_cache", param="tags")
        result = await self._engine(lambda e: e.wake_up(wanted or None))
        self.sleeping = await self._engine(lambda e: bool(e.is_sleeping()))
        return {**_as_dict(result), "is_sleeping": self.sleeping}

    async def is_sleeping(self) -> dict[str, Any]:
        if not self._enabled:  # as vLLM answers: an instance that cannot sleep is not sleeping
            return {"is_sleeping": False}
        self._check_supported()
        self.sleeping = await self._engine(lambda e: bool(e.is_sleeping()))
        return {"is_sleeping": self.sleeping}

    def add_routes(self, app: FastAPI) -> None:
        @app.post("/sleep")
        async def sleep(level: int = Query(1)) -> dict[str, Any]:
            return await self.sleep(level)

        @app.post("/wake_up")
        async def wake_up(tags: list[str] | None = Query(None)) -> dict[str, Any]:
            return await self.wake_up(tags)

        @app.get("/is_sleeping")
        async def is_sleeping() -> dict[str, Any]:
            return await self.is_sleeping()
