"""A fake pdlaunch instance for proxy tests: a FastAPI app whose /health answers ok and whose POST /v1/completions
calls the subclass's `completions`, each request's JSON body kept in `bodies` (a subclass reads it with
`await self.body(request)`)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request


class FakeInstance:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.post("/v1/completions")(self.completions)

    async def body(self, request: Request) -> dict[str, Any]:
        """The request's JSON body, kept in `bodies`."""
        body: dict[str, Any] = await request.json()
        self.bodies.append(body)
        return body

    async def completions(self, request: Request) -> Any:
        raise NotImplementedError("a fake instance answers /v1/completions in its subclass")
