"""Routes only the deployment itself may call (RequireAuth lets `/internal/...` through with the
internal token alone, see http/auth.py).

`POST /internal/kv/release {"request_id": ...}`: a prefill frees the KV it holds for a decode leg
that will not run (the client went away after the prefill leg, the decode refused the request or
is unreachable) now, instead of after kv_transfer.kv_lease_seconds. The id is the
`remote_request_id` of the prefill's kv_transfer_params.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.limits import read_json_object
from pdlaunch.server.engine_loop import EngineLoop

KV_RELEASE_PATH = "/internal/kv/release"

log = logging.getLogger("pdlaunch.server")


class KVReleaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=512)


class HeldKV:
    """Releases of held KV, from a route or from the instance itself (fire and forget)."""

    def __init__(self, engine_loop: EngineLoop) -> None:
        self._loop = engine_loop
        self._tasks: set[asyncio.Task[Any]] = set()  # referenced until done, or the loop may drop them

    async def release(self, request_id: str) -> bool:
        return await self._loop.release_held_kv(request_id)

    def release_soon(self, request_id: str) -> None:
        task = asyncio.ensure_future(self._release_logged(request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release_logged(self, request_id: str) -> None:
        try:
            await self.release(request_id)
        except OpenAIError as exc:  # engine not ready: the lease frees the blocks later
            log.warning("could not release the KV held for %s now: %s", request_id, exc.message)


def add_internal_routes(app: FastAPI, held_kv: HeldKV) -> None:
    @app.post(KV_RELEASE_PATH)
    async def release_kv(request: Request) -> dict[str, Any]:
        body = KVReleaseRequest.model_validate(await read_json_object(request))
        return {"request_id": body.request_id, "released": await held_kv.release(body.request_id)}
