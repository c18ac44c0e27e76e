"""A decode's cancel_push with nothing in flight frees the hold at once, unless another decode's READ claimed it
(the proxy retried a decode leg elsewhere): that READ's blocks stay held until its read_done/release or the
claim's cap. cancel_push used to free them at the next poll, under the READ (another prompt could reuse them)."""

from __future__ import annotations

import time

from pdlaunch.kv_transfer.messages import CancelPushAnswer, CancelPushRequest, ClaimReadRequest, Empty
from pdlaunch.kv_transfer.notifications import ReadDone
from pdlaunch.kv_transfer.prefill.holds import READ_GRACE_SECONDS, HoldTable


def _cancel(table: HoldTable) -> CancelPushAnswer:
    return table.cancel_push(CancelPushRequest(type="cancel_push", request_id="r1", owner="a1b2c3d4e5f60718"))


def _claim(table: HoldTable, reader: str) -> Empty:
    return table.claim_read(ClaimReadRequest(type="claim_read", load="load-0", request_id="r1", seconds=5.0,
                                             reader=reader))


def test_a_cancelled_push_leaves_a_hold_another_decodes_read_claimed() -> None:
    table = HoldTable(lease_seconds=60.0)
    table.hold("r1", [[3, 4]])
    assert _claim(table, "decode-A") == Empty()  # decode A's READ runs
    assert _cancel(table) == CancelPushAnswer(in_flight=False)  # decode B gave up its push
    assert table.poll(time.monotonic()) == set(), "freed while decode A's READ runs"
    table.on_read_done(ReadDone(load="load-0", kind="read_done", request_id="r1", reader="decode-A"))
    assert table.poll(time.monotonic()) == {"r1"}
    assert _claim(table, "decode-A") == Empty()  # A's late claim: A read the blocks while they were held


def test_a_cancelled_push_leaves_a_read_claimed_hold_until_the_claims_cap() -> None:
    table = HoldTable(lease_seconds=1.0)  # the claim's cap: its 5s, clamped to the lease, + READ_GRACE_SECONDS
    table.hold("r1", [[3, 4]])
    _claim(table, "decode-A")
    _cancel(table)
    assert table.poll(time.monotonic() + 1.5) == set()
    assert table.poll(time.monotonic() + 1.0 + READ_GRACE_SECONDS + 1.0) == {"r1"}


def test_a_cancelled_push_still_frees_an_unclaimed_hold_at_once() -> None:
    table = HoldTable(lease_seconds=60.0)
    table.hold("r1", [[3, 4]])
    assert _cancel(table) == CancelPushAnswer(in_flight=False)
    assert table.poll(time.monotonic()) == {"r1"}


def test_a_resharding_readers_other_rank_claims_a_hold_after_a_cancelled_push() -> None:
    """Each decode rank of a resharding reader claims the hold: the second one's claim is not refused because
    another decode cancelled its push in between."""
    table = HoldTable(lease_seconds=60.0)
    table.hold("r1", [[3, 4]])
    _claim(table, "decode-A")
    _cancel(table)
    assert _claim(table, "decode-A") == Empty()
    for _ in range(2):
        table.on_read_done(ReadDone(load="load-0", kind="read_done", request_id="r1", reader="decode-A", readers=2))
    assert table.poll(time.monotonic()) == {"r1"}
