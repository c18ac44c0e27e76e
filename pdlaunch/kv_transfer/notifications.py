"""The NIXL notifications of the KV plane (a discriminated union on "kind"): read_done and release (decode to
prefill: it READ the blocks of a held request, or gave up on them), push_done and push_failed (prefill to decode: a
push's WRITE ended), forget (prefill to decode: drop my metadata, I go to sleep). A notification that does not fit
its model is dropped (`parse_notification`); they are built from these models too (`encode_notification`), never
as hand-made strings. The same bounds as the side channel's messages (messages.py) apply to their fields.

Both transports deliver them from peers that passed an authenticated handshake (NIXL: only they got our agent's
metadata; Mooncake MACs each one: mooncake/agent.py). Notifications are best effort: what losing one costs
is LOST_NOTIFICATION's.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pdlaunch.kv_transfer.messages import Name, Nonce


class _Notif(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ReadDone(_Notif):
    kind: Literal["read_done", "release"]
    request_id: Name
    reader: Name  # the decode engine id, as in its claim_read
    load: Nonce  # the decode load's id, as in its claim_read (messages.py): the prefill counts per (reader, load)
    # Ranks of that decode that each send one (resharding): the decode's word; the prefill counts against the plan
    # of the layout the decode's handshake stated (prefill/reader_plans.py) and logs a count that disagrees.
    readers: int = Field(1, ge=1, le=1024)


class PushDone(_Notif):
    kind: Literal["push_done"]
    nonce: Nonce


class PushFailed(_Notif):
    kind: Literal["push_failed"]
    nonce: Nonce
    error: Annotated[str, Field(max_length=4096)] = ""


class Forget(_Notif):
    kind: Literal["forget"]
    agent_name: Name
    kv_epoch: int | None = Field(None, ge=0, lt=2**31)


Notification = Annotated[ReadDone | PushDone | PushFailed | Forget, Field(discriminator="kind")]

# What a notification that never arrives costs its peer, by kind: each waits for its own timeout instead.
_LOST_READ = "the prefill keeps the request's blocks until its hold's lease (kv_transfer.kv_lease_seconds) or the " \
    "decode's READ claim ends"
LOST_NOTIFICATION = {
    "push_done": "the decode waits for it until its load's deadline (kv_transfer.transfer_timeout_seconds), "
                 "then fails the request",
    "push_failed": "the decode fails the request at its load's deadline (kv_transfer.transfer_timeout_seconds) "
                   "and keeps its blocks until its drain ends",
    "read_done": _LOST_READ,
    "release": _LOST_READ,
    "forget": "the decode keeps this prefill's Mooncake session until its next handshake with it",
}
_NOTIFICATION = TypeAdapter(Notification)


def parse_notification(message: bytes) -> Notification | None:
    """A NIXL notification as a validated model, or None when it is not one of ours (malformed)."""
    try:
        return _NOTIFICATION.validate_json(message)
    except (ValidationError, ValueError):
        return None


def encode_notification(notif: ReadDone | PushDone | PushFailed | Forget) -> bytes:
    """The bytes a NIXL (or Mooncake) notification carries."""
    return notif.model_dump_json().encode()
