"""Read claims of a held request (pull): the decode sends its claim right after it posts the READ, so the claim
may arrive after the READ's read_done. Such a claim is answered as claimed (the hold lived until the read_done);
a claim of a hold that expired or was released is refused, before or after the hold left the table.

Claims and notifications name their decode ("reader"): when the proxy sends one prefill's params to a second decode
(it retried a decode leg whose instance died), the second decode's claim after the first one's read_done is refused
(its blocks may already serve another prompt), and a hold both decodes claimed lives until both have notified."""

from __future__ import annotations

import time

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.messages import ClaimReadRequest, Empty
from pdlaunch.kv_transfer.notifications import ReadDone
from pdlaunch.kv_transfer.prefill.holds import READ_GRACE_SECONDS, HoldTable


def _claim(table: HoldTable, request_id: str = "r1", reader: str = "decode-0") -> Empty:
    return table.claim_read(ClaimReadRequest(type="claim_read", load="load-0", request_id=request_id, seconds=5.0,
                                             reader=reader))


def _notify(table: HoldTable, kind: str, readers: int = 1, reader: str = "decode-0") -> None:
    table.on_read_done(ReadDone(load="load-0", kind=kind, request_id="r1", reader=reader, readers=readers))  # type: ignore[arg-type]


def test_a_claim_before_the_read_done_extends_the_hold() -> None:
    table = HoldTable(lease_seconds=0.5)
    table.hold("r1", [[3, 4]])
    assert _claim(table) == Empty()
    hold = table.get("r1")
    assert hold is not None and hold.read_claimed and hold.deadline > time.monotonic() + 5.0


def test_a_claim_after_the_read_done_is_answered_as_claimed() -> None:
    table = HoldTable(lease_seconds=60.0)
    table.hold("r1", [[3, 4]])
    _notify(table, "read_done")
    assert _claim(table) == Empty()  # done, not yet polled
    assert table.poll(time.monotonic()) == {"r1"}
    assert table.get("r1") is None
    assert _claim(table) == Empty()  # freed after its read_done: still answered
    with pytest.raises(KVTransferError, match="not held here any more"):
        _claim(table, "never-held")


def test_a_claim_after_a_release_or_an_expiry_is_refused() -> None:
    released = HoldTable(lease_seconds=60.0)
    released.hold("r1", [[3, 4]])
    _notify(released, "release")
    with pytest.raises(KVTransferError, match="not held here any more"):
        _claim(released)
    released.poll(time.monotonic())
    with pytest.raises(KVTransferError, match="not held here any more"):
        _claim(released)

    expired = HoldTable(lease_seconds=0.01)
    expired.hold("r1", [[3, 4]])
    assert expired.poll(time.monotonic() + 1.0) == {"r1"}  # the lease ended before any READ
    _notify(expired, "read_done")  # a READ of freed blocks ends: it must not count
    with pytest.raises(KVTransferError, match="not held here any more"):
        _claim(expired)


def test_a_hold_of_several_readers_counts_as_read_once_every_reader_read() -> None:
    table = HoldTable(lease_seconds=60.0)
    table.hold("r1", [[3, 4]])
    _notify(table, "read_done", readers=2)
    hold = table.get("r1")
    assert hold is not None and not hold.done
    _notify(table, "release", readers=2)  # the other rank gave up
    assert table.poll(time.monotonic()) == {"r1"}
    with pytest.raises(KVTransferError, match="not held here any more"):
        _claim(table)


def test_read_holds_are_forgotten_a_lease_after_they_were_freed() -> None:
    table = HoldTable(lease_seconds=60.0)
    table.hold("r1", [[3, 4]])
    _notify(table, "read_done")
    now = time.monotonic()
    table.poll(now)
    assert _claim(table) == Empty()
    table.poll(now + 61.0)
    with pytest.raises(KVTransferError, match="not held here any more"):
        _claim(table)


def test_another_decodes_claim_after_the_first_decodes_read_done_is_refused() -> None:
    """decode-0 READ the blocks and said so; the proxy's retry sends decode-1 the same params: before the poll frees
    the hold and after, decode-1 is refused (its READ would see blocks another prompt may reuse), decode-0 is not."""
    table = HoldTable(lease_seconds=60.0)
    table.hold("r1", [[3, 4]])
    _claim(table, reader="decode-0")
    _notify(table, "read_done", reader="decode-0")
    with pytest.raises(KVTransferError, match=r"read by another load of its params \(load load-0 of decode-0\)"):
        _claim(table, reader="decode-1")
    assert table.poll(time.monotonic()) == {"r1"}
    with pytest.raises(KVTransferError, match="read by another load"):
        _claim(table, reader="decode-1")
    assert _claim(table, reader="decode-0") == Empty()  # its own late claim: held throughout


def test_a_hold_two_decodes_claimed_lives_until_both_notified() -> None:
    """decode-1 claimed before decode-0's read_done: the blocks stay held for decode-1's READ until its own
    notification, read_done or release."""
    for last in ("read_done", "release"):
        table = HoldTable(lease_seconds=60.0)
        table.hold("r1", [[3, 4]])
        _claim(table, reader="decode-0")
        _claim(table, reader="decode-1")
        _notify(table, "read_done", reader="decode-0")
        assert table.poll(time.monotonic()) == set(), "freed under decode-1's READ"
        hold = table.get("r1")
        assert hold is not None and not hold.done
        _notify(table, last, reader="decode-1")
        assert table.poll(time.monotonic()) == {"r1"}


def test_a_claimer_that_never_notifies_holds_the_blocks_until_its_cap() -> None:
    """decode-1 claimed and died mid-READ: decode-0's read_done does not free the blocks under it; the claim's
    hard cap (its seconds, at most the lease, + READ_GRACE_SECONDS) does."""
    table = HoldTable(lease_seconds=0.5)
    table.hold("r1", [[3, 4]])
    _claim(table, reader="decode-1")
    _claim(table, reader="decode-0")
    _notify(table, "read_done", reader="decode-0")
    now = time.monotonic()
    assert table.poll(now + 1.0) == set()
    assert table.poll(now + 0.5 + READ_GRACE_SECONDS + 1.0) == {"r1"}
    assert table.get("r1") is None
    assert _claim(table, reader="decode-0") == Empty(), "decode-0 read it while it was held: not an expiry"


def test_a_notification_after_the_hold_ended_is_expected_and_one_for_an_unknown_hold_is_warned(
        caplog: pytest.LogCaptureFixture) -> None:
    # The proxy releases a departed client's hold; the decode, aborting its load, sends its own release after.
    table = HoldTable(lease_seconds=60.0)
    table.hold("r1", [[3, 4]])
    assert table.release("r1")
    assert table.poll(time.monotonic()) == {"r1"}
    with caplog.at_level("DEBUG", logger="pdlaunch.kv_transfer.prefill.holds"):
        _notify(table, "release")
        _notify(table, "read_done")  # a READ posted before the abort ends after it
        table.on_read_done(ReadDone(load="load-0", kind="release", request_id="r9", reader="decode-0"))
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [lvl for lvl, _ in levels] == ["DEBUG", "DEBUG", "WARNING"], levels
    assert "after its hold ended (released: its decode leg will not run)" in levels[0][1]
    assert "request r9, which is not held here" in levels[2][1] and "decode-0" in levels[2][1]
    with pytest.raises(KVTransferError, match="not held here any more: released: its decode leg will not run"):
        _claim(table)  # a decode whose leg the proxy gave up is told so, not that a lease expired
