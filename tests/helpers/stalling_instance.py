"""A fake instance app (FastAPI) whose /health stops answering once it stalled: the proxy tests' decodes that take
a leg and then never answer it (a SIGSTOPped or hung instance), which the proxy's health probe must then see."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI

STALL_S = 30.0  # far past every test's deadlines: a stalled fake answers nothing in time


class StallingInstance:
    """`/health` answers until `stalled` is set, then hangs. A subclass defines `completions(request)`, the fake's
    `/v1/completions`."""

    completions: Any  # the subclass's route

    def __init__(self) -> None:
        self.stalled = asyncio.Event()
        self.app = FastAPI()
        self.app.get("/health")(self.health)
        self.app.post("/v1/completions")(self.completions)

    async def health(self) -> Any:
        if self.stalled.is_set():
            await asyncio.sleep(STALL_S)
        return {"status": "ok"}

    async def stall(self) -> None:
        """Take the leg and answer nothing; /health hangs from now on."""
        self.stalled.set()
        await asyncio.sleep(STALL_S)
