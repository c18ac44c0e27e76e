"""kv_transfer_params as typed, bounded, signed models (field names as vLLM's NIXL connector uses them).

Two directions:
- `RemoteDecodeRequest`: what the proxy (or a vLLM-style proxy) sends a prefill instance:
  {"do_remote_decode": true} plus, from vLLM's proxies, the remote_* fields set to null.
- `PrefillAnswer`: what a prefill instance answers and the proxy hands to a decode instance
  ({"do_remote_prefill": true, remote_engine_id, remote_block_ids, ...}). The prefill signs it
  (HMAC-SHA256 with a key derived from the deployment secret, over the canonical JSON of every other
  field, `expires_at` included); a decode accepts it only with a valid signature before its expiry,
  so a client can neither forge one nor point the decode at an address of its choice.

Plus `UnsignedPush` (push_params.py: vLLM's push proxy's params, without block ids or signature).

`check_kv_transfer_params` runs once, at the engine's boundary (LLMEngine.check_kv_transfer_params,
called where the HTTP side submits a request): it turns the raw JSON into one of these models
(`KVTransferParams`), or raises KVTransferError naming `kv_transfer_params.<field>` (HTTP 400).
Everything below the engine (scheduler, connectors, their sides and loads) takes the models.
"""

from __future__ import annotations

import math
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pdlaunch.errors import KVTransferError, error_text
from pdlaunch.kv_transfer.auth import PARAMS_PURPOSE, JSONObject, canonical, derive_key, mac, mac_ok

__all__ = ["JSONObject"]  # params on the wire (the HTTP body, the prefill's signed answer) are JSON objects

MAX_ID_CHARS = 512  # request ids carry the client's X-Request-Id plus a suffix
MAX_HOST_CHARS = 253  # a DNS name
MAX_TP = 64
MAX_GROUPS = 16  # KV-cache groups (full + sliding-window layers)
MAX_BLOCK_ID = 2**31 - 1
MAX_PROMPT_TOKENS = 10**8
MAX_TOP_LOGPROBS = 64
CLOCK_SKEW_SECONDS = 5  # prefill and decode of a multi-node deployment read different wall clocks
SIGNATURE_FIELD = "signature"
EXPIRY_FIELD = "expires_at"  # unix seconds (an int: a re-serializing proxy keeps it exact)
# PD first token (engine/first_token.py): asked for in the prefill leg, answered signed.
RETURN_FIRST_TOKEN = "return_first_token"
FIRST_TOKEN_IDS = "first_token_ids"
FIRST_TOKEN_LOGPROBS = "first_token_logprobs"

_Groups = TypeVar("_Groups", list[list[int]], list[list[str]])  # per KV-cache group, one entry per block
_Id = Field(min_length=1, max_length=MAX_ID_CHARS)
_Digest = Field(max_length=128)


class _Strict(BaseModel):
    # strict: "5" is not 5, "abc" is not a TP size; forbid: a field we do not know is refused, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class RemoteDecodeRequest(_Strict):
    """Prefill leg: keep this request's KV for a remote decode (do_remote_decode) or not."""

    do_remote_decode: bool = False
    do_remote_prefill: Literal[False] | None = None
    remote_engine_id: None = None
    remote_block_ids: None = None
    remote_host: None = None
    remote_port: None = None
    remote_request_id: None = None
    # Our proxy asks for the sampled token in the signed answer (first_token.py); vLLM's proxies do not.
    return_first_token: bool = False


class TopLogprob(_Strict):
    token_id: int = Field(ge=0, le=MAX_BLOCK_ID)
    logprob: float


class FirstTokenLogprob(_Strict):
    """The logprob (and top alternatives) of the prefill's sampled token, for a decode whose client asked."""

    logprob: float
    top: list[TopLogprob] = Field(default_factory=list, max_length=MAX_TOP_LOGPROBS)


def _bounded_blocks(value: _Groups | None, info: ValidationInfo) -> _Groups | None:
    limit = (info.context or {}).get("max_blocks")
    if value is not None and limit is not None:
        for group in value:
            if len(group) > limit:
                raise ValueError(f"a group names {len(group)} blocks; a request here has at most {limit}")
    return value


class PrefillAnswer(_Strict):
    """Decode leg: load the prompt's KV from the prefill engine these params name."""

    do_remote_prefill: Literal[True]
    do_remote_decode: Literal[False] = False
    remote_engine_id: str = _Id
    remote_request_id: str = _Id
    # Per KV-cache group, one block id per block of the prompt (-1: a sliding-window block not kept).
    remote_block_ids: list[list[int]] | None = Field(None, max_length=MAX_GROUPS)
    remote_host: str | None = Field(None, min_length=1, max_length=MAX_HOST_CHARS)
    remote_port: int | None = Field(None, ge=1, le=65535)
    tp_size: int = Field(1, ge=1, le=MAX_TP)
    kv_heads_per_rank: int | None = Field(None, ge=1, le=4096)
    transfer_mode: Literal["auto", "pull", "push", "storage"] = "auto"
    num_prompt_tokens: int | None = Field(None, ge=1, le=MAX_PROMPT_TOKENS)
    # vLLM's NIXL connector also answers these (we send them; a vLLM prefill's answer may carry them).
    remote_num_tokens: int | None = Field(None, ge=1, le=MAX_PROMPT_TOKENS)
    remote_blocks_expiry_time: float | None = Field(None, ge=0, le=2**40)
    dcp_size: int | None = Field(None, ge=1, le=MAX_TP)
    pp_size: int | None = Field(None, ge=1, le=MAX_TP)
    kv_epoch: int | None = Field(None, ge=0, le=2**31)
    kv_checksum: list[list[str]] | None = Field(None, max_length=MAX_GROUPS)
    # TP prefill: each rank's side channel and advertised address, and its block digests.
    remote_ports: list[int] | None = Field(None, max_length=MAX_TP)
    remote_hosts: list[str] | None = Field(None, max_length=MAX_TP)
    rank_kv_checksums: list[list[list[str]] | None] | None = Field(None, max_length=MAX_TP)
    # The token the prefill sampled (signed with the rest, so a client cannot inject output): the decode
    # continues from prompt + these instead of recomputing the last prompt token (engine/first_token.py).
    first_token_ids: list[int] | None = Field(None, min_length=1, max_length=1)
    first_token_logprobs: list[FirstTokenLogprob] | None = Field(None, min_length=1, max_length=1)
    expires_at: int | None = Field(None, ge=0, le=2**40)
    signature: str | None = Field(None, max_length=128)

    @field_validator("remote_block_ids")
    @classmethod
    def _block_ids(cls, value: list[list[int]] | None, info: ValidationInfo) -> list[list[int]] | None:
        for group in value or []:
            if any(not -1 <= b <= MAX_BLOCK_ID for b in group):
                raise ValueError(f"block ids lie in [-1, {MAX_BLOCK_ID}]")
        return _bounded_blocks(value, info)

    @field_validator("remote_ports")
    @classmethod
    def _ports(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(not 1 <= p <= 65535 for p in value):
            raise ValueError("ports lie in [1, 65535]")
        return value

    @field_validator("remote_hosts")
    @classmethod
    def _hosts(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not 1 <= len(h) <= MAX_HOST_CHARS for h in value):
            raise ValueError(f"host names have 1 to {MAX_HOST_CHARS} characters")
        return value

    @field_validator("kv_checksum")
    @classmethod
    def _digests(cls, value: list[list[str]] | None, info: ValidationInfo) -> list[list[str]] | None:
        if value is not None and any(len(d) > 128 for group in value for d in group):
            raise ValueError("block digests have at most 128 characters")
        return _bounded_blocks(value, info)

    @model_validator(mode="after")
    def _consistent(self) -> PrefillAnswer:
        for name in ("remote_ports", "remote_hosts", "rank_kv_checksums"):
            value = getattr(self, name)
            if value is not None and len(value) != self.tp_size:
                raise ValueError(f"{name} has {len(value)} entries for tp_size {self.tp_size}")
        return self  # which fields a transfer needs is the connector's to say (nixl: decode/side.py `_required`)


class UnsignedPush(BaseModel):
    """Decode leg from vLLM's push proxy: the prefill's coordinates without block ids (push_params.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    do_remote_prefill: Literal[True]
    do_remote_decode: Literal[False] | None = False
    remote_engine_id: str = _Id
    remote_request_id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    remote_host: str = Field(min_length=1, max_length=MAX_HOST_CHARS)
    remote_port: int = Field(ge=1, le=65535)
    tp_size: int | None = Field(1, ge=1, le=MAX_TP)
    remote_block_ids: None = None


# A request's kv_transfer_params once the engine's boundary parsed them.
KVTransferParams = RemoteDecodeRequest | PrefillAnswer | UnsignedPush


def wants_remote_decode(params: KVTransferParams | None) -> bool:
    """Prefill leg: keep the request's KV for a remote decode."""
    return isinstance(params, RemoteDecodeRequest) and params.do_remote_decode


def wants_remote_prefill(params: KVTransferParams | None) -> bool:
    """Decode leg: load the prompt's KV from the prefill engine the params name."""
    return isinstance(params, PrefillAnswer | UnsignedPush)


def first_token_ids(params: KVTransferParams | None) -> list[int]:
    """Decode: the prefill's sampled token(s) from validated params (engine/first_token.py). Only signed
    params are trusted; unsigned push registrations never carry them."""
    if not isinstance(params, PrefillAnswer) or params.signature is None:
        return []
    return list(params.first_token_ids or [])


def params_key(secret: str) -> bytes:
    return derive_key(secret, PARAMS_PURPOSE)


def _signed_bytes(params: JSONObject) -> bytes:
    return canonical({k: v for k, v in params.items() if k != SIGNATURE_FIELD})


def answer_json(answer: PrefillAnswer) -> JSONObject:
    """A prefill's answer as the JSON object its response carries (vLLM's field names; unset fields left out)."""
    return answer.model_dump(exclude_none=True)


def sign_kv_transfer_params(params: JSONObject, key: bytes, valid_seconds: float, now: float) -> JSONObject:
    """The prefill's answer with `expires_at` (now + valid_seconds, the KV lease: the blocks are gone
    after it anyway) and `signature` added. `now` is time.time()."""
    signed = {k: v for k, v in params.items() if k not in (SIGNATURE_FIELD, EXPIRY_FIELD)}
    signed[EXPIRY_FIELD] = int(math.floor(now + valid_seconds))
    signed[SIGNATURE_FIELD] = mac(key, _signed_bytes(signed)).hex()
    return signed


def _field_error(exc: ValidationError) -> KVTransferError:
    first = exc.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    field = "kv_transfer_params" + (f".{path}" if path else "")
    return KVTransferError(error_text(first), field=field,
                           hint="send the kv_transfer_params the prefill instance answered, unchanged")


def params_expired(raw: object, parsed: KVTransferParams | None) -> bool:
    """Whether `raw` kv_transfer_params asked for a remote prefill that the engine's check parsed into None: signed
    by our prefill but past their lease (kv_transfer.load_failure_policy recompute, LLMEngine.check_kv_transfer_params),
    so the request, once queued, computes its prompt there."""
    return parsed is None and isinstance(raw, dict) and raw.get("do_remote_prefill") not in (None, False)


def check_kv_transfer_params(raw: object, key: bytes | None, *, max_blocks: int, lease_seconds: float,
                             now: float) -> RemoteDecodeRequest | PrefillAnswer | None:
    """`raw` parsed into its model, or KVTransferError naming the field. Params that ask for a
    remote prefill must carry a valid signature made with `key` and not be expired (`now`: time.time()).
    key None: this instance has no deployment secret, so it accepts no remote-prefill params."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise KVTransferError(f"expected an object, got {type(raw).__name__}", field="kv_transfer_params")
    remote_prefill = raw.get("do_remote_prefill") not in (None, False)
    try:
        if not remote_prefill:
            return RemoteDecodeRequest.model_validate(raw)
        answer = PrefillAnswer.model_validate(raw, context={"max_blocks": max_blocks})
    except ValidationError as e:
        raise _field_error(e) from None
    if key is None:
        raise KVTransferError("this instance has no deployment secret to check the prefill's signature with",
                              field="kv_transfer_params.signature",
                              hint="set security.deployment_secret (pdlaunch serve fills it)")
    if answer.signature is None or answer.expires_at is None:
        raise KVTransferError(
            "missing: only kv_transfer_params a prefill instance of this deployment signed are accepted",
            field=f"kv_transfer_params.{SIGNATURE_FIELD if answer.signature is None else EXPIRY_FIELD}",
            hint="send the kv_transfer_params the prefill instance answered, unchanged")
    try:
        tag = bytes.fromhex(answer.signature)
    except ValueError:
        tag = b""
    try:
        signed_bytes = _signed_bytes(raw)
    except ValueError:  # a value JSON cannot carry (NaN): no prefill signed that
        signed_bytes = b""
    if not signed_bytes or not mac_ok(key, signed_bytes, tag):
        raise KVTransferError("does not match: the params were changed or not signed by this deployment",
                              field="kv_transfer_params.signature",
                              hint="send the kv_transfer_params the prefill instance answered, unchanged")
    if answer.expires_at < now:
        raise KVTransferError(
            f"expired {now - answer.expires_at:.0f}s ago: the prefill freed that KV at the end of its lease",
            field=f"kv_transfer_params.{EXPIRY_FIELD}",
            hint="send the decode request sooner, or raise kv_transfer.kv_lease_seconds")
    if answer.expires_at > now + lease_seconds + CLOCK_SKEW_SECONDS:
        raise KVTransferError(f"lies beyond the {lease_seconds:g}s KV lease",
                              field=f"kv_transfer_params.{EXPIRY_FIELD}",
                              hint="prefill and decode must share kv_transfer.kv_lease_seconds and a synced clock")
    return answer
