"""Routes only the deployment itself may call (RequireAuth lets `/internal/...` through with the
internal token alone, see http/auth.py).

`POST /internal/kv/release {"request_id": ...}`: a prefill frees the KV it holds for a decode leg
that will not run (the client went away after the prefill leg, the decode refused the request or
is unreachable) now, instead of after kv_transfer.kv_lease_seconds. The id is the
`remote_request_id` of the prefill's kv_transfer_params.
"""

from __future__ import annotations

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from pdlaunch.http import JsonObject
from pdlaunch.http.limits import read_json_object
from pdlaunch.server.instance import Handler, instance_of

KV_RELEASE_PATH = "/internal/kv/release"


class KVReleaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=512)


async def release_kv(request: Request) -> JsonObject:
    body = KVReleaseRequest.model_validate(await read_json_object(request))
    released = await instance_of(request).engine_loop.release_held_kv(body.request_id)
    return {"request_id": body.request_id, "released": released}


ROUTES: list[tuple[str, str, Handler]] = [("POST", KV_RELEASE_PATH, release_kv)]
