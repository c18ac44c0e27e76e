"""Routes only the deployment itself may call (RequireAuth lets `/internal/...` through with the
internal token alone, see http/auth.py).

`POST /internal/kv/release {"request_id": ...}`: a prefill frees the KV it holds for a decode leg
that will not run (the client went away after the prefill leg, the decode refused the request or
is unreachable) now, instead of after kv_transfer.kv_lease_seconds. The id is the
`remote_request_id` of the prefill's kv_transfer_params.

`POST /internal/kv/release {"client_request_id": ...}`: the same for every request of a prefill leg whose
X-Request-Id it was, for a proxy whose client left while that leg's answer was on its way (the proxy never
read the params, and the prefill had answered before it saw the connection close). The proxy sends it only
for ids it made itself (unique), never for a client's own X-Request-Id, which another request may reuse.

`POST /internal/kv/forget_engine {"engine_id": ...}`: another instance of the deployment died, and its launcher asks
every peer, before it restarts it, to drop the transfer agents of that engine from its KV connector (on every TP
rank): a peer's mapping of the dead engine's GPU memory would keep that memory allocated, and the restarted
instance would find it taken (kv_transfer/agent.py). Answers {"engine_id": ..., "forgotten": n}, n agents dropped.
"""

from __future__ import annotations

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pdlaunch.http import JsonObject
from pdlaunch.http.limits import read_json_object
from pdlaunch.server.instance import Handler, instance_of

KV_RELEASE_PATH = "/internal/kv/release"
KV_FORGET_ENGINE_PATH = "/internal/kv/forget_engine"


class KVReleaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(None, min_length=1, max_length=512)
    client_request_id: str | None = Field(None, min_length=1, max_length=512)

    @model_validator(mode="after")
    def _one_id(self) -> KVReleaseRequest:
        if (self.request_id is None) == (self.client_request_id is None):
            raise ValueError("give exactly one of request_id and client_request_id")
        return self


async def release_kv(request: Request) -> JsonObject:
    body = KVReleaseRequest.model_validate(await read_json_object(request))
    loop = instance_of(request).engine_loop
    if body.client_request_id is not None:
        released = await loop.release_held_kv_of_client(body.client_request_id)
        return {"client_request_id": body.client_request_id, "released": released}
    assert body.request_id is not None  # _one_id
    return {"request_id": body.request_id, "released": await loop.release_held_kv(body.request_id)}


class KVForgetEngineRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    engine_id: str = Field(min_length=1, max_length=512)


async def forget_engine(request: Request) -> JsonObject:
    body = KVForgetEngineRequest.model_validate(await read_json_object(request))
    forgotten = await instance_of(request).engine_loop.forget_engine(body.engine_id)
    return {"engine_id": body.engine_id, "forgotten": forgotten}


ROUTES: list[tuple[str, str, Handler]] = [("POST", KV_RELEASE_PATH, release_kv),
                                          ("POST", KV_FORGET_ENGINE_PATH, forget_engine)]
