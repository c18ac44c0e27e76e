"""The base of our ASGI middleware: it acts on HTTP requests only; lifespan (and any other) scopes
pass straight through to the app."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class HTTPMiddleware:
    """Subclasses implement `handle`, called for `http` scopes only; they call `self.app` to go on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement handle()")
