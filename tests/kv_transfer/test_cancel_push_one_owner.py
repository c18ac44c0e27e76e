"""A decode's cancel_push ends that decode's interest in a hold only. The proxy may retry a request's decode leg on
another decode with the same prefill params: decode A's cancel used to mark the whole hold cancelled, so decode
B's next push chunk was refused (no WRITE), and, with nothing in flight, the hold was freed under B, whose load
then failed and recomputed the prompt. Now the hold stays while another decode pushed from it (and has not
cancelled), is pushing or reading; a lone decode's cancel still frees it at once, and the lease still bounds it."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.messages import CancelPushAnswer, CancelPushRequest, PushRequest
from pdlaunch.kv_transfer.notifications import PushDone, PushFailed, parse_notification
from pdlaunch.kv_transfer.prefill.hold import Hold
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.push_sender import PushSender
from tests.kv_transfer.push_fakes import LEASE_S, LandingAgent, held_table, push_chunk

LOAD_A = "aaaaaaaaaaaaaaaa"  # the load nonce of decode A, which gives the request up
LOAD_B = "bbbbbbbbbbbbbbbb"  # of decode B, where the proxy retried it


def _pushed(spec: KVCacheSpec, holds: HoldTable, owner: str, nonce: str) -> Hold:
    """A first (not last) chunk of load `owner`'s push landed: the hold it pushed from."""
    message = push_chunk(spec, owner, nonce, last=False)
    hold = holds.claim_push(message, spec, wait=0.0)
    assert hold is not None
    holds.unclaim_push(hold, message)
    return hold


def _cancel(holds: HoldTable, owner: str) -> CancelPushAnswer:
    return holds.cancel_push(CancelPushRequest(type="cancel_push", request_id="p-1", owner=owner))


def _push(holds: HoldTable, spec: KVCacheSpec, agent: LandingAgent, message: PushRequest) -> None:
    """The side channel accepts the push request; a sender thread WRITEs it."""
    hold = holds.claim_push(message, spec, wait=0.0)
    assert hold is not None
    sender = PushSender(cast(Any, agent), holds, cast(Any, None), transfer_timeout=30.0)
    sender.spec = spec
    sender._push(hold, message, "decode-agent", time.monotonic())


def test_another_decodes_push_chunk_is_accepted_and_written_after_a_cancel() -> None:
    spec, holds = held_table()
    agent = LandingAgent()
    _push(holds, spec, agent, push_chunk(spec, LOAD_B, "00000000000000b1", last=False))
    assert _cancel(holds, LOAD_A) == CancelPushAnswer(in_flight=False)
    assert holds.poll(time.monotonic()) == set(), "freed under decode B, which pushed from it"
    _push(holds, spec, agent, push_chunk(spec, LOAD_B, "00000000000000b2", last=True, start=5))
    assert agent.writes == 2, "decode B's next chunk was not written"
    assert [parse_notification(n) for _, n in agent.sent] == [PushDone(kind="push_done", nonce="00000000000000b1"),
                                                             PushDone(kind="push_done", nonce="00000000000000b2")]
    assert holds.poll(time.monotonic()) == {"p-1"}  # B's last chunk landed


def test_a_cancel_with_nothing_in_flight_does_not_free_a_hold_another_decode_pushed_from() -> None:
    spec, holds = held_table()
    hold = _pushed(spec, holds, LOAD_B, "00000000000000b1")  # its first chunk landed
    assert _cancel(holds, LOAD_A) == CancelPushAnswer(in_flight=False)
    assert holds.poll(time.monotonic()) == set()
    assert holds.get("p-1") is not None and not hold.done
    assert _cancel(holds, LOAD_B) == CancelPushAnswer(in_flight=False)  # B gives up too: no one wants it
    assert holds.poll(time.monotonic()) == {"p-1"}


def test_a_cancel_during_its_own_write_leaves_the_hold_to_the_decode_that_pushed_before() -> None:
    spec, holds = held_table()
    hold = _pushed(spec, holds, LOAD_B, "00000000000000b1")
    chunk_a = push_chunk(spec, LOAD_A, "00000000000000a1", last=False)
    assert holds.claim_push(chunk_a, spec, wait=0.0) is hold
    assert _cancel(holds, LOAD_A) == CancelPushAnswer(in_flight=True)
    holds.unclaim_push(hold, chunk_a)  # A's WRITE ended: its push_done/push_failed told A
    assert holds.poll(time.monotonic()) == set(), "freed under decode B, which pushed from it"


def test_a_cancelled_decodes_later_chunk_is_refused() -> None:
    spec, holds = held_table()
    hold = _pushed(spec, holds, LOAD_B, "00000000000000b1")  # its first chunk landed
    _cancel(holds, LOAD_A)
    with pytest.raises(KVTransferError, match="cancelled"):
        holds.claim_push(push_chunk(spec, LOAD_A, "00000000000000a1", last=False), spec, wait=0.0)
    assert hold.busy == 0 and not hold.pushing


def test_a_lone_decodes_cancel_frees_the_hold_it_pushed_from_at_once() -> None:
    spec, holds = held_table()
    _pushed(spec, holds, LOAD_A, "00000000000000a1")  # its first chunk landed
    assert _cancel(holds, LOAD_A) == CancelPushAnswer(in_flight=False)
    assert holds.poll(time.monotonic()) == {"p-1"}


def test_a_hold_kept_for_a_decode_that_never_comes_back_ends_at_its_lease() -> None:
    spec, holds = held_table()
    _pushed(spec, holds, LOAD_B, "00000000000000b1")  # its first chunk landed
    _cancel(holds, LOAD_A)
    assert holds.poll(time.monotonic() + LEASE_S / 2) == set()
    assert holds.poll(time.monotonic() + LEASE_S + 1.0) == {"p-1"}


class _FailingAgent(LandingAgent):
    """Every WRITE fails."""

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> Any:
        self.writes += 1
        return SimpleNamespace(state=lambda: "ERR", release=lambda: None, num_bytes=sum(n for _, n in local),
                               error="remote access error")




@pytest.mark.parametrize("cancelled", [True, False], ids=["cancelled-before-its-write", "its-write-failed"])
def test_a_push_that_ends_without_landing_leaves_the_hold_to_the_decode_that_pushed_before(cancelled: bool) -> None:
    """Decode A's push ends without a WRITE landing (A cancelled it while it waited for a sender thread, or its
    WRITE failed): A hears push_failed and computes the prompt; decode B's next chunk still finds the blocks."""
    spec, holds = held_table()
    _pushed(spec, holds, LOAD_B, "00000000000000b1")
    chunk_a = push_chunk(spec, LOAD_A, "00000000000000a1", last=True)
    hold = holds.claim_push(chunk_a, spec, wait=0.0)
    assert hold is not None
    if cancelled:
        assert _cancel(holds, LOAD_A) == CancelPushAnswer(in_flight=True)
    agent = _FailingAgent()
    sender = PushSender(cast(Any, agent), holds, cast(Any, None), transfer_timeout=30.0)
    sender.spec = spec
    sender._push(hold, chunk_a, "decode-a-agent", time.monotonic())
    assert agent.writes == (0 if cancelled else 1)
    assert [type(parse_notification(n)) for _, n in agent.sent] == [PushFailed]
    assert holds.poll(time.monotonic()) == set(), "freed under decode B, which pushed from it"
    _push(holds, spec, LandingAgent(), push_chunk(spec, LOAD_B, "00000000000000b2", last=True, start=5))
    assert holds.poll(time.monotonic()) == {"p-1"}


def test_a_lone_decodes_failed_push_frees_the_hold_at_once() -> None:
    spec, holds = held_table()
    message = push_chunk(spec, LOAD_A, "00000000000000a1", last=False)
    hold = holds.claim_push(message, spec, wait=0.0)
    assert hold is not None
    sender = PushSender(cast(Any, _FailingAgent()), holds, cast(Any, None), transfer_timeout=30.0)
    sender.spec = spec
    sender._push(hold, message, "decode-a-agent", time.monotonic())
    assert holds.poll(time.monotonic()) == {"p-1"}
