"""`/sleep`, `/wake_up`, `/is_sleeping`: engine sleep control (CuMem pools, DESIGN.md "CuMem and sleep").

Refused with a 400 naming the fix unless the deployment enables sleep mode and the engine offers
`sleep(level)` / `wake_up(tags)`; the engine calls run on the engine thread.
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi import FastAPI, Query

from pdlaunch.config.models import DeploymentConfig
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.errors import OpenAIError

SLEEP_CALL_TIMEOUT_S = 120.0  # level 2 backs up nothing but level 1 copies all weights to host memory


class SleepControl:
    def __init__(self, engine_loop: EngineLoop, config: DeploymentConfig) -> None:
        self._loop = engine_loop
        self._enabled = config.model.enable_sleep_mode
        self.sleeping = False

    def _check_supported(self) -> None:
        if not self._enabled:
            raise OpenAIError(400, "sleep mode is not enabled on this instance",
                              param="enable_sleep_mode", code="sleep_mode_disabled")
        engine = self._loop.engine
        if engine is None or not (hasattr(engine, "sleep") and hasattr(engine, "wake_up")):
            raise OpenAIError(400, "sleep mode is not supported by this engine on this platform",
                              param="enable_sleep_mode", code="sleep_mode_unsupported")

    async def sleep(self, level: int) -> dict[str, Any]:
        self._check_supported()
        if level not in (1, 2):
            raise OpenAIError(400, "level must be 1 (keep weights in host memory) or 2 (discard all)",
                              param="level")
        if self._loop.num_pending:
            raise OpenAIError(409, f"{self._loop.num_pending} request(s) in flight; sleep when idle",
                              code="busy")
        await self._loop.call(lambda e: e.sleep(level), timeout=SLEEP_CALL_TIMEOUT_S)
        self.sleeping = True
        return {"is_sleeping": True, "level": level}

    async def wake_up(self, tags: Optional[list[str]]) -> dict[str, Any]:
        self._check_supported()
        unknown = sorted(set(tags or []) - {"weights", "kv_cache"})
        if unknown:
            raise OpenAIError(400, f"unknown tags {unknown}; use weights and/or kv_cache", param="tags")
        await self._loop.call(lambda e: e.wake_up(tags or None), timeout=SLEEP_CALL_TIMEOUT_S)
        is_sleeping = await self._loop.call(lambda e: bool(getattr(e, "is_sleeping", lambda: False)()))
        self.sleeping = is_sleeping
        return {"is_sleeping": is_sleeping}

    def add_routes(self, app: FastAPI) -> None:
        @app.post("/sleep")
        async def sleep(level: int = Query(1)) -> dict[str, Any]:
            return await self.sleep(level)

        @app.post("/wake_up")
        async def wake_up(tags: Optional[list[str]] = Query(None)) -> dict[str, Any]:
            return await self.wake_up(tags)

        @app.get("/is_sleeping")
        async def is_sleeping() -> dict[str, Any]:
            self._check_supported()
            return {"is_sleeping": self.sleeping}
