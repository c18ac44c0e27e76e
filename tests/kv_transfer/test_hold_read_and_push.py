"""One hold that a reading decode and a pushing decode both took (the proxy retried a decode leg on another decode
with the same params, and the two decodes load in different transfer modes, or both push): it ends once every
decode that took it is through with it. A READ whose claim is in keeps it until its notifications; an accepted push
keeps it until its last chunk landed, or it failed or was cancelled.

Before, a read_done ended the hold while another decode's staged push was between chunks (its next chunk was
refused: that decode recomputed the prompt), and a push's last chunk ended it under another decode's claimed READ
(the blocks could serve another prompt mid-READ) or between another push's chunks."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.messages import CancelPushAnswer, CancelPushRequest, ClaimReadRequest, Empty, PushRequest
from pdlaunch.kv_transfer.notifications import PushDone, ReadDone, parse_notification
from pdlaunch.kv_transfer.prefill.hold import Hold
from pdlaunch.kv_transfer.prefill.holds import READ_GRACE_SECONDS, HoldTable
from pdlaunch.kv_transfer.prefill.push_sender import PushSender
from tests.kv_transfer.push_fakes import LEASE_S, LandingAgent, held_table, push_chunk

READER_A = "decode-a-engine"  # decode A pulls (READ)
LOAD_B = "bbbbbbbbbbbbbbbb"  # the load nonce of decode B, which pushes
LOAD_C = "cccccccccccccccc"  # of decode C, which pushes too


def _accept(spec: KVCacheSpec, holds: HoldTable, message: PushRequest) -> Hold:
    """The side channel accepted the push request: claimed, queued for a sender thread."""
    hold = holds.claim_push(message, spec, wait=0.0)
    assert hold is not None
    return hold


def _send(spec: KVCacheSpec, holds: HoldTable, agent: LandingAgent, hold: Hold, message: PushRequest) -> None:
    """A sender thread runs the accepted push: WRITE, push_done, unclaim."""
    sender = PushSender(cast(Any, agent), holds, cast(Any, None), transfer_timeout=30.0)
    sender.spec = spec
    sender._push(hold, message, "decode-agent", time.monotonic())


def _push(spec: KVCacheSpec, holds: HoldTable, agent: LandingAgent, message: PushRequest) -> None:
    _send(spec, holds, agent, _accept(spec, holds, message), message)


def _claim(holds: HoldTable, reader: str = READER_A) -> Empty:
    return holds.claim_read(ClaimReadRequest(type="claim_read", load="load-0", request_id="p-1", seconds=5.0,
                                             reader=reader))


def _notify(holds: HoldTable, kind: str = "read_done", reader: str = READER_A) -> None:
    holds.on_read_done(ReadDone(load="load-0", kind=kind, request_id="p-1", reader=reader))  # type: ignore[arg-type]


def _done_nonces(agent: LandingAgent) -> list[str]:
    done = [parse_notification(n) for _, n in agent.sent]
    assert all(isinstance(n, PushDone) for n in done), done
    return [cast(PushDone, n).nonce for n in done]


@pytest.mark.parametrize("kind", ["read_done", "release"])
def test_a_read_done_leaves_the_hold_to_a_push_between_its_chunks(kind: str) -> None:
    """Decode B's staged push landed its first chunk; decode A READ the blocks (or gave up) and said so: B's next
    chunk is still accepted and written, and the hold ends with B's last chunk."""
    spec, holds = held_table()
    agent = LandingAgent()
    _claim(holds)
    _push(spec, holds, agent, push_chunk(spec, LOAD_B, "00000000000000b1", last=False))
    _notify(holds, kind)
    assert holds.poll(time.monotonic()) == set(), "freed under decode B's push, between its chunks"
    _push(spec, holds, agent, push_chunk(spec, LOAD_B, "00000000000000b2", last=True, start=5))
    assert _done_nonces(agent) == ["00000000000000b1", "00000000000000b2"]
    assert holds.poll(time.monotonic()) == {"p-1"}


def test_a_read_done_during_an_accepted_push_frees_nothing_before_its_write_ended() -> None:
    """Decode B's push was accepted (queued for a sender thread, not started) when decode A's read_done came: the
    blocks stay until the WRITE posted from them ended, and it is posted (B loads the prompt)."""
    spec, holds = held_table()
    agent = LandingAgent()
    message = push_chunk(spec, LOAD_B, "00000000000000b1", last=True)
    hold = _accept(spec, holds, message)
    _notify(holds)
    assert holds.poll(time.monotonic()) == set(), "freed under an accepted push"
    _send(spec, holds, agent, hold, message)
    assert agent.writes == 1 and _done_nonces(agent) == ["00000000000000b1"]
    assert holds.poll(time.monotonic()) == {"p-1"}


def test_a_pushs_last_chunk_leaves_the_hold_to_a_claimed_read() -> None:
    """Decode A's READ claimed the hold; decode B's push landed whole: the blocks stay until A's read_done."""
    spec, holds = held_table()
    _claim(holds)
    _push(spec, holds, LandingAgent(), push_chunk(spec, LOAD_B, "00000000000000b1", last=True))
    assert holds.poll(time.monotonic()) == set(), "freed under decode A's claimed READ"
    _notify(holds)
    assert holds.poll(time.monotonic()) == {"p-1"}
    assert _claim(holds) == Empty(), "A read the blocks while they were held"


def test_a_pushs_last_chunk_leaves_the_hold_to_another_push_between_its_chunks() -> None:
    """Decode C's staged push came first and landed a chunk; decode B's push landed whole: C's next chunk is still
    accepted and written (the push that came first took the hold), and its last one ends the hold."""
    spec, holds = held_table()
    agent = LandingAgent()
    _push(spec, holds, agent, push_chunk(spec, LOAD_C, "00000000000000c1", last=False))
    _push(spec, holds, agent, push_chunk(spec, LOAD_B, "00000000000000b1", last=True))
    assert holds.poll(time.monotonic()) == set(), "freed under decode C's push, between its chunks"
    _push(spec, holds, agent, push_chunk(spec, LOAD_C, "00000000000000c2", last=True, start=5))
    assert _done_nonces(agent) == ["00000000000000c1", "00000000000000b1", "00000000000000c2"]
    assert holds.poll(time.monotonic()) == {"p-1"}


def test_a_push_that_ends_without_landing_after_a_read_done_frees_the_hold() -> None:
    """Decode A READ the blocks while decode B's push was between chunks; B then cancels (or its push fails): no
    decode is at the hold any more, and it ends at once rather than at its lease."""
    spec, holds = held_table()
    _claim(holds)
    _push(spec, holds, LandingAgent(), push_chunk(spec, LOAD_B, "00000000000000b1", last=False))
    _notify(holds)
    assert holds.poll(time.monotonic()) == set()
    answer = holds.cancel_push(CancelPushRequest(type="cancel_push", request_id="p-1", owner=LOAD_B))
    assert answer == CancelPushAnswer(in_flight=False)
    assert holds.poll(time.monotonic()) == {"p-1"}
    assert _claim(holds) == Empty(), "A read the blocks while they were held"


def test_a_push_that_never_comes_back_keeps_a_read_hold_until_its_lease_counted_as_read() -> None:
    """Decode B died between chunks without cancelling: the lease (or the READ claim's cap, if later) bounds the
    hold, and it counts as read by decode A, not as a lease expiry."""
    spec, holds = held_table()
    _claim(holds)
    _push(spec, holds, LandingAgent(), push_chunk(spec, LOAD_B, "00000000000000b1", last=False))
    _notify(holds)
    now = time.monotonic()
    assert holds.poll(now + LEASE_S / 2) == set()
    hold = holds.get("p-1")
    assert hold is not None
    assert holds.poll(now + LEASE_S + READ_GRACE_SECONDS + 1.0) == {"p-1"}
    assert not hold.expired
    assert _claim(holds) == Empty(), "A read the blocks while they were held"


def test_a_push_that_comes_after_a_read_done_is_refused() -> None:
    """The rule's other half: a decode that comes after the hold ended (here: decode A read it, no other decode
    had taken it) fails its load, and computes the prompt."""
    spec, holds = held_table()
    _claim(holds)
    _notify(holds)
    with pytest.raises(KVTransferError, match="not held here any more"):
        holds.claim_push(push_chunk(spec, LOAD_B, "00000000000000b1", last=True), spec, wait=0.0)
    assert holds.poll(time.monotonic()) == {"p-1"}


def test_the_proxys_release_ends_a_hold_whose_claimed_read_ended() -> None:
    """Decode A READ the blocks and said so while decode B's push was between chunks; then the proxy releases the
    hold (B's leg ended: its client left, or B died). A's READ no longer keeps it: it ends at the next poll rather
    than at its lease, counted as read by A, and B's next chunk is refused."""
    spec, holds = held_table()
    _claim(holds)
    _push(spec, holds, LandingAgent(), push_chunk(spec, LOAD_B, "00000000000000b1", last=False))
    _notify(holds)
    assert holds.release("p-1"), "refused for a READ that had ended"
    assert holds.poll(time.monotonic()) == {"p-1"}
    assert _claim(holds) == Empty(), "A read the blocks while they were held"
    with pytest.raises(KVTransferError, match="not held here any more"):
        holds.claim_push(push_chunk(spec, LOAD_B, "00000000000000b2", last=True, start=5), spec, wait=0.0)


def test_the_proxys_release_leaves_a_hold_to_a_claimed_read_still_running() -> None:
    """The other half: decode A's READ claimed the hold and has not said it ended: the release is refused, and the
    hold lives until A's notification, even with decode B's push through."""
    spec, holds = held_table()
    _claim(holds)
    _push(spec, holds, LandingAgent(), push_chunk(spec, LOAD_B, "00000000000000b1", last=True))
    assert not holds.release("p-1")
    assert holds.poll(time.monotonic()) == set()
    _notify(holds)
    assert holds.poll(time.monotonic()) == {"p-1"}
