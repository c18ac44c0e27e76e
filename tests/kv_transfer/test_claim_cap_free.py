"""A hold a decode's READ claimed and whose read_done/release never came is freed at the claim's hard cap, and
counted and logged as that (KV_CLAIM_CAP_FREES), not as a lease expiry: it used to be counted in
KV_EXPIRED_REQUESTS and logged as "not fetched within the lease" (it was fetched, or being fetched)."""

from __future__ import annotations

import logging
import time

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.messages import ClaimReadRequest
from pdlaunch.kv_transfer.notifications import ReadDone
from pdlaunch.kv_transfer.prefill.holds import READ_GRACE_SECONDS, HoldTable
from pdlaunch.metrics.kv_transfer import KV_CLAIM_CAP_FREES, KV_EXPIRED_REQUESTS

LOGGER = "pdlaunch.kv_transfer.prefill.holds"


def _claim(table: HoldTable, reader: str) -> None:
    table.claim_read(ClaimReadRequest(type="claim_read", load="load-0", request_id="r1", seconds=5.0, reader=reader))


def _counts() -> tuple[float, float]:
    return KV_EXPIRED_REQUESTS._value.get(), KV_CLAIM_CAP_FREES._value.get()


def test_a_claimed_read_whose_read_done_never_came_is_freed_as_such(caplog: pytest.LogCaptureFixture) -> None:
    table = HoldTable(lease_seconds=1.0)
    table.hold("r1", [[3, 4]])
    _claim(table, "decode-A")
    expired, capped = _counts()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert table.poll(time.monotonic() + 1.5) == set()  # past the lease, within the claim's cap (1s + grace)
        assert table.poll(time.monotonic() + 1.0 + READ_GRACE_SECONDS + 1.0) == {"r1"}
    assert _counts() == (expired, capped + 1)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1, lines
    assert ("KV of request r1 freed at the hard cap of the READ claim of load load-0 of decode-A: no read_done/release"
            in lines[0])
    assert not any("not fetched within" in line for line in lines)
    with pytest.raises(KVTransferError, match="freed at the hard cap of the READ claim of load load-0 of decode-A") \
            as e:
        _claim(table, "decode-B")
    assert e.value.hint is not None and "claimed its READ died or timed out" in e.value.hint


def test_a_hold_read_by_one_decode_and_claimed_by_another_that_never_ended(
        caplog: pytest.LogCaptureFixture) -> None:
    """Decode A read it; decode B's claimed READ never said it ended: freed at B's cap, counted as B's."""
    table = HoldTable(lease_seconds=1.0)
    table.hold("r1", [[3, 4]])
    _claim(table, "decode-A")
    _claim(table, "decode-B")
    table.on_read_done(ReadDone(load="load-0", kind="read_done", request_id="r1", reader="decode-A"))
    expired, capped = _counts()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert table.poll(time.monotonic() + 1.0 + READ_GRACE_SECONDS + 1.0) == {"r1"}
    assert _counts() == (expired, capped + 1)
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        "KV of request r1 freed at the hard cap of the READ claim of load load-0 of decode-B: no read_done/release "
        "came from it (the decode died, timed out, or its notification was lost)"]


def test_an_unclaimed_hold_is_still_a_lease_expiry(caplog: pytest.LogCaptureFixture) -> None:
    table = HoldTable(lease_seconds=1.0)
    table.hold("r1", [[3, 4]])
    expired, capped = _counts()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert table.poll(time.monotonic() + 2.0) == {"r1"}
    assert _counts() == (expired + 1, capped)
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        "KV of request r1 was not fetched within the 1.0s lease: freed"]
