"""The typed messages of the KV plane's side channel: requests (a discriminated union on "type") and their
answers; the NIXL notifications (on "kind") are notifications.py's. Everything a peer sends is validated against
these before any handler runs; a message that does not fit is refused.

Bounds: ids and names at most 512 characters, at most MAX_GROUPS KV-cache groups, block ids in
[-1, 2**31), NIXL metadata as lowercase hex, seconds finite and within a day (the prefill clamps
claims to its lease on top).

A push and its cancel name their `owner`: the nonce of the decode's load. A staged push's chunks each carry
their own nonce (their push_done/push_failed names it), so only the owner tells the prefill whose WRITE is in
flight when two decodes push one request id (a proxy retried the decode leg). A stage request names its
`reader` (the decode engine, as a claim_read does) and that decode's remaining `seconds`: it claims the hold for
that reader (prefill/holds.py). A push and a listen name their `reader` too: the prefill keeps which decode engine
each decode agent it loaded belongs to, so that it can forget a dead engine's agents (prefill/decode_peers.py; an
agent's name does not say it). A decode's handshake states its KV heads split (`DecodeLayout`): the prefill rank
counts that decode's read_done/release notifications against the plan it implies (prefill/reader_plans.py). A
claim_read, stage request and release name their decode `load` too (decode/load.py `Load.load_id`, which the TP ranks
of one decode share): the prefill counts claims and read_done/release notifications per (reader, load), so that one
load's end never ends a hold another load of the same params on the same decode (a replayed or retried leg) still
READs. Both ends run the same pdlaunch version: a push or cancel without an owner, a
stage, push or listen without a reader, or a claim_read, stage or release without a load (an older decode), is
refused, naming the field and the fix.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pdlaunch.kv_transfer.auth import JSONObject
from pdlaunch.kv_transfer.handshake import HandshakeInfo

logger = logging.getLogger(__name__)

MAX_GROUPS = 16
MAX_NAME_CHARS = 512
MAX_SECONDS = 86400.0  # a claim or push deadline beyond a day is not ours: 1e308 is refused
MAX_METADATA_HEX = 512 << 10  # NIXL agent metadata is a few hundred bytes on CPU, KiBs with GPU rkeys

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
Nonce = Annotated[str, Field(min_length=1, max_length=64)]
_Hex = Annotated[str, Field(min_length=2, max_length=MAX_METADATA_HEX, pattern=r"^(?:[0-9a-f]{2})+$")]
_BLOCK_ID_END = 2**31
MAX_PUSH_BLOCKS = 1 << 20  # blocks of one group in one push request (a 16M-token prompt at block size 16)
_BlockId = Annotated[int, Field(ge=-1, lt=_BLOCK_ID_END)]
_Start = Annotated[int, Field(ge=0, lt=_BLOCK_ID_END)]
_Count = Annotated[int, Field(ge=1, le=MAX_PUSH_BLOCKS)]
_Seconds = Annotated[float, Field(ge=0.0, le=MAX_SECONDS, allow_inf_nan=False)]
_Address = Annotated[int, Field(ge=0, lt=2**64)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DecodeLayout(_Message):
    """How the decode that shakes hands splits its KV heads: the prefill rank works out from it how many of that
    decode's ranks notify it per request (reshard.py `expected_readers`), rather than trusting each notification's
    `readers` (prefill/reader_plans.py)."""

    reader: Name  # the decode engine id, as its notifications name it
    tp_size: int = Field(ge=1, le=1024)  # at most the `readers` a notification may name
    kv_heads_per_rank: int = Field(ge=1, le=4096)


class HandshakeRequest(_Message):
    type: Literal["handshake"]
    engine_id: Name  # the prefill engine the decode expects to answer
    decode: DecodeLayout | None = None  # None: a client that reads no KV states none (a probe)


def _sent(value: object, what: str) -> object:
    """A field whose default ("") is refused: a message of an older decode lacks it (module docstring). (A
    model-level "before" validator would see the JSON as Python objects, which strict mode then refuses for
    tuples.)"""
    if value == "":
        raise ValueError(f"{what} is missing: the decode runs an older pdlaunch; run the same pdlaunch version on "
                         "prefill and decode")
    return value


class _Owned(_Message):
    owner: Nonce = Field("", validate_default=True)  # the nonce of the decode's load (module docstring)

    @field_validator("owner", mode="before")
    @classmethod
    def _has_owner(cls, owner: object) -> object:
        return _sent(owner, "owner (the nonce of the decode's load)")


class _FromReader(_Message):
    reader: Name = Field("", validate_default=True)  # the decode engine id (its TP ranks share it)

    @field_validator("reader", mode="before")
    @classmethod
    def _has_reader(cls, reader: object) -> object:
        return _sent(reader, "reader (the decode engine id)")


class _OfLoad(_Message):
    load: Nonce = Field("", validate_default=True)  # the decode load's id, which its TP ranks share (module docstring)

    @field_validator("load", mode="before")
    @classmethod
    def _has_load(cls, load: object) -> object:
        return _sent(load, "load (the id of the decode's load)")


class PushRequest(_Owned, _FromReader):
    """WRITE held blocks into the decode's blocks (or staging slots). runs[g] = [[decode_start, prefill_start,
    count], ...]: decode ids [decode_start, +count) receive prefill blocks [prefill_start, +count). Runs, not
    one pair per block: an 8k-token prompt is 512 pairs, whose encoding and validation on both ends cost
    ~0.7 ms a push on an H200 host, and usually one run (RESULTS.md, 2026-11-24)."""

    type: Literal["push"]
    request_id: Name
    nonce: Nonce  # this push (a staged push: this chunk); its push_done/push_failed names it
    last: bool = True
    agent_name: Name
    agent_metadata: _Hex
    runs: list[list[tuple[_Start, _Start, _Count]]] = Field(max_length=MAX_GROUPS)
    base_addrs: list[_Address] = Field(max_length=MAX_GROUPS)
    block_bytes: list[Annotated[int, Field(ge=1)]] = Field(max_length=MAX_GROUPS)
    device_id: int = Field(0, ge=0, le=1024)
    deadline_in: _Seconds

    @model_validator(mode="after")
    def _runs_in_range(self) -> PushRequest:
        if not len(self.runs) == len(self.base_addrs) == len(self.block_bytes):  # the sender indexes each per group
            raise ValueError(f"runs, base_addrs and block_bytes name {len(self.runs)}, {len(self.base_addrs)} and "
                             f"{len(self.block_bytes)} KV-cache groups: one entry per group each")
        for g, group in enumerate(self.runs):
            if sum(count for _, _, count in group) > MAX_PUSH_BLOCKS:
                raise ValueError(f"runs[{g}] names more than {MAX_PUSH_BLOCKS} blocks")
            if any(max(d, p) + count > _BLOCK_ID_END for d, p, count in group):
                raise ValueError(f"runs[{g}] names a block id of 2**31 or more")
        return self

    def pairs(self) -> list[list[tuple[int, int]]]:
        """[(decode_id, prefill_id), ...] per group, one pair per block."""
        return [[(d + i, p + i) for d, p, count in group for i in range(count)] for group in self.runs]

    def prefill_blocks(self) -> list[list[int]]:
        """The prefill block ids of each group, in order."""
        return [[b for _, p, count in group for b in range(p, p + count)] for group in self.runs]


class StageRequest(_FromReader, _OfLoad):
    """Copy held blocks into staging slots for decode `reader`'s `load` to READ. Like a claim_read, it claims the
    hold for that load (capped by `seconds`, decode's remaining time) until that load's read_done/release."""

    type: Literal["stage"]
    request_id: Name
    blocks: list[list[_BlockId]] = Field(max_length=MAX_GROUPS)
    nonce: Nonce | None = None  # names this request: one sent again gets the first copy's answer
    seconds: _Seconds


class UnstageRequest(_Message):
    type: Literal["unstage"]
    ticket: Nonce


class ClaimReadRequest(_OfLoad):
    type: Literal["claim_read"]
    request_id: Name
    seconds: _Seconds
    reader: Name  # the decode engine id (its TP ranks share it): holds.py counts claims per (reader, load)


class CancelPushRequest(_Owned):
    """Decode gave up its pushes of `request_id` (those of `owner`, its load), or that load (pull or push) ended
    before its transfer started."""

    type: Literal["cancel_push"]
    request_id: Name


class ReleaseRequest(_FromReader, _OfLoad):
    """One rank of decode `reader` gave up reading `request_id` (its `load` failed or was aborted): the "release"
    notification (notifications.py ReadDone, counted the same: prefill/holds.py `on_read_done`), sent here by a
    decode rank that has no NIXL agent of this prefill rank to notify, since it has not shaken hands with it (its
    handshake failed, or was never tried). `nonce` names this release: sent again after a lost answer, it counts
    once."""

    type: Literal["release"]
    request_id: Name
    readers: int = Field(1, ge=1, le=1024)  # ranks of that decode that each send one (resharding), as ReadDone's
    nonce: Nonce


class ForgetRequest(_Message):
    type: Literal["forget"]
    agent_name: Name


class ListenRequest(_FromReader):
    type: Literal["listen"]
    agent_name: Name
    agent_metadata: _Hex


class HeldBlocksRequest(_Message):
    """Decode with push params that lack block ids (vLLM's push proxy): which blocks hold the request of
    this prompt? By its request id, else by the client's X-Request-Id; waits up to `wait` for the hold (the
    decode asks again, in short waits, until its deadline: HeldBlocksAnswer)."""

    type: Literal["held_blocks"]
    request_id: Name | None = None
    client_request_id: Name
    prompt_digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    wait: _Seconds


class DropHeldRequest(_Owned):
    """A decode load of push params without block ids gave up (its client left, or it timed out) before "held_blocks"
    named the request: the prefill drops the hold of that request (named as HeldBlocksRequest names it, and only of
    the same prompt) now, or as soon as it holds it within `seconds` (the decode's transfer timeout; clamped to the
    lease). Else a prefill leg that ends after the decode leg left keeps its blocks for the lease."""

    type: Literal["drop_held"]
    request_id: Name | None = None
    client_request_id: Name
    prompt_digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    seconds: _Seconds


SideChannelMessage = Annotated[
    HandshakeRequest | PushRequest | StageRequest | UnstageRequest | ClaimReadRequest | CancelPushRequest
    | ReleaseRequest | ForgetRequest | ListenRequest | HeldBlocksRequest | DropHeldRequest,
    Field(discriminator="type"),
]


class Envelope(_Message):
    """A request frame's body: the message, when it was sent (unix seconds) and a nonce never reused."""

    ts: Annotated[float, Field(allow_inf_nan=False)]
    nonce: Annotated[str, Field(min_length=16, max_length=64, pattern=r"^[0-9a-f]+$")]
    msg: SideChannelMessage


SideChannelRequest = (HandshakeRequest | PushRequest | StageRequest | UnstageRequest | ClaimReadRequest
                      | CancelPushRequest | ReleaseRequest | ForgetRequest | ListenRequest | HeldBlocksRequest
                      | DropHeldRequest)


# -- side-channel answers (the body a handler returns; the server adds "ok") ---------------------
class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")  # "ok" (and "error") travel next to the fields


class Empty(_Reply):
    """An answer that only says the request was served."""


class HandshakeAnswer(_Reply):
    info: HandshakeInfo


class StageAnswer(_Reply):
    ticket: Nonce
    slots: list[list[_BlockId]] = Field(max_length=MAX_GROUPS)


class CancelPushAnswer(_Reply):
    in_flight: bool  # a WRITE of the owner's may still land in the decode's blocks: push_done/push_failed follows


class HeldBlocksAnswer(_Reply):
    """The held request and its blocks; request_id None: none was held within the request's wait (the decode asks
    again while its load has time left and its client is still there)."""

    request_id: Name | None
    block_ids: list[list[_BlockId]] = Field(max_length=MAX_GROUPS)
    kv_epoch: int = Field(0, ge=0, lt=2**31)

    @model_validator(mode="after")
    def _nothing_when_not_held(self) -> HeldBlocksAnswer:
        if self.request_id is None and self.block_ids:
            raise ValueError("block_ids of no held request")
        return self


class ListenAnswer(_Reply):
    listening: bool


class ForgetAnswer(_Reply):
    forgot: bool


class Answer(_Message):
    """An answer frame's body: `re` is the nonce of the request it answers (None: the request was
    not authenticated, so nothing of it is echoed)."""

    ts: Annotated[float, Field(allow_inf_nan=False)]
    re: str | None = None
    answer: JSONObject
