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

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pdlaunch.http import JsonObject
from pdlaunch.http.body_errors import body_error
from pdlaunch.http.limits import read_model
from pdlaunch.server.instance import Handler, instance_of

KV_RELEASE_PATH = "/internal/kv/release"
KV_FORGET_ENGINE_PATH = "/internal/kv/forget_engine"
MAX_ID_CHARS = 512
_ID_CHARS = f"a string of 1 to {MAX_ID_CHARS} characters"

Body = TypeVar("Body", bound=BaseModel)


async def read_body(request: Request, model: type[Body], path: str) -> Body:
    """The body of `POST path` validated as `model`; a malformed one is a 400 naming the field, what was wrong and
    what to send (http/body_errors.py), not pydantic's words."""
    try:
        return await read_model(request, model)
    except ValidationError as exc:
        raise body_error(exc, model, f"POST {path}") from None


class KVReleaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    request_id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS,
                                   description=f"the remote_request_id of a prefill's kv_transfer_params, {_ID_CHARS}")
    client_request_id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS,
                                          description=f"the X-Request-Id of a prefill leg, {_ID_CHARS}")

    @model_validator(mode="after")
    def _one_id(self) -> KVReleaseRequest:
        if (self.request_id is None) == (self.client_request_id is None):
            got = "neither" if self.request_id is None else "both"
            raise ValueError(f"send exactly one of request_id and client_request_id (got {got})")
        return self


async def release_kv(request: Request) -> JsonObject:
    body = await read_body(request, KVReleaseRequest, KV_RELEASE_PATH)
    loop = instance_of(request).engine_loop
    if body.client_request_id is not None:
        released = await loop.release_held_kv_of_client(body.client_request_id)
        return {"client_request_id": body.client_request_id, "released": released}
    assert body.request_id is not None  # _one_id
    return {"request_id": body.request_id, "released": await loop.release_held_kv(body.request_id)}


class KVForgetEngineRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    engine_id: str = Field(min_length=1, max_length=MAX_ID_CHARS,
                           description=f"the engine id of the instance that died, {_ID_CHARS}")


async def forget_engine(request: Request) -> JsonObject:
    body = await read_body(request, KVForgetEngineRequest, KV_FORGET_ENGINE_PATH)
    forgotten = await instance_of(request).engine_loop.forget_engine(body.engine_id)
    return {"engine_id": body.engine_id, "forgotten": forgotten}


ROUTES: list[tuple[str, str, Handler]] = [("POST", KV_RELEASE_PATH, release_kv),
                                          ("POST", KV_FORGET_ENGINE_PATH, forget_engine)]
