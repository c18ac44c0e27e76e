"""A push request sent again by decode's side channel (PendingCall resends when the connection resets
before the answer) after the prefill accepted the first copy: the resend is answered at once and
queues no second push, also once the first push ended and its hold was freed."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.messages import Empty, PushRequest
from pdlaunch.kv_transfer.prefill.hold import Hold
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.side import PrefillSide
from tests.kv_transfer.pd_procs import make_spec

WAIT_S = 30.0  # the resend must be answered at once, never by this running out


class _Pusher:
    def __init__(self, fail: bool = False) -> None:
        self.queued: list[tuple[Hold, PushRequest]] = []
        self.fail = fail

    def submit(self, hold: Hold, message: PushRequest, peer: str, received: float) -> None:
        if self.fail:
            self.fail = False
            raise KVTransferError("the sender pool is shut down")
        self.queued.append((hold, message))


def _side(pusher: _Pusher) -> tuple[Any, HoldTable]:
    holds = HoldTable(lease_seconds=60.0)
    holds.hold("p-1", [[3, 4]])
    side = SimpleNamespace(holds=holds, spec=make_spec(), pusher=pusher,
                           kv=SimpleNamespace(transfer_timeout_seconds=WAIT_S),
                           decodes=SimpleNamespace(peer=lambda name, metadata, engine_id: "decode-agent"))
    return side, holds


def _push(nonce: str = "a1b2c3d4e5f60718", last: bool = True) -> PushRequest:
    spec = make_spec()
    return PushRequest(type="push", reader="d", request_id="p-1", nonce=nonce, owner="0123456789abcdef", last=last,
                       agent_name="decode", agent_metadata="00", runs=[[(0, 3, 2)]], base_addrs=[4096],
                       block_bytes=spec.block_bytes, deadline_in=WAIT_S)


def _on_push(side: Any, message: PushRequest) -> Empty:
    return PrefillSide._on_push(cast(PrefillSide, side), message)


def test_a_resent_push_is_answered_without_a_second_push() -> None:
    pusher = _Pusher()
    side, holds = _side(pusher)
    message = _push()
    assert _on_push(side, message) == Empty()
    started = time.monotonic()
    assert _on_push(side, message) == Empty()  # the first copy is still claimed (its WRITE runs)
    assert time.monotonic() - started < WAIT_S / 2
    assert len(pusher.queued) == 1
    hold = pusher.queued[0][0]
    assert hold.busy == 1
    holds.unclaim_push(hold, pusher.queued[0][1], done=True)  # the sender thread: WRITE done, last chunk
    assert holds.poll(time.monotonic()) == {"p-1"}
    assert _on_push(side, message) == Empty()  # a resend arriving after the hold was freed
    assert len(pusher.queued) == 1


def test_another_push_of_the_request_is_not_taken_for_a_resend() -> None:
    pusher = _Pusher()
    side, holds = _side(pusher)
    _on_push(side, _push("0000000000000001", last=False))
    holds.unclaim_push(*pusher.queued[0])
    _on_push(side, _push("0000000000000002"))
    assert [m.nonce for _, m in pusher.queued] == ["0000000000000001", "0000000000000002"]


def test_a_push_that_was_not_queued_is_served_when_sent_again() -> None:
    pusher = _Pusher(fail=True)
    side, holds = _side(pusher)
    message = _push()
    with pytest.raises(KVTransferError, match="shut down"):
        _on_push(side, message)
    assert _on_push(side, message) == Empty()
    assert len(pusher.queued) == 1 and pusher.queued[0][0].busy == 1
