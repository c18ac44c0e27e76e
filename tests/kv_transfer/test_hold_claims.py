"""Exclusive claims of a held request (pushes): the next staged chunk waits for the last one's unclaim."""

from __future__ import annotations

import threading

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.prefill.hold import Hold
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from tests.kv_transfer.pd_procs import make_spec

WAIT_S = 30.0  # generous: the waiting claim must end by the unclaim, never by this


def _table() -> tuple[HoldTable, KVCacheSpec]:
    table = HoldTable(lease_seconds=60.0)
    table.hold("r1", [[3, 4]])
    return table, make_spec()


def test_an_exclusive_claim_waits_for_the_claim_before_it() -> None:
    table, spec = _table()
    first = table.claim("r1", [[3]], spec.block_bytes, spec, exclusive=True)
    got: list[Hold | BaseException] = []
    started = threading.Event()

    def second() -> None:
        started.set()
        try:
            got.append(table.claim("r1", [[4]], spec.block_bytes, spec, exclusive=True, wait=WAIT_S))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            got.append(e)

    thread = threading.Thread(target=second)
    thread.start()
    assert started.wait(WAIT_S)
    assert not got  # still waiting: the first chunk's claim is active
    table.unclaim(first)  # the sender thread saw its WRITE end (decode had its push_done already)
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert got == [first] and first.busy == 1


def test_an_exclusive_claim_is_refused_after_its_wait() -> None:
    table, spec = _table()
    table.claim("r1", [[3]], spec.block_bytes, spec, exclusive=True)
    with pytest.raises(KVTransferError, match="already being sent"):
        table.claim("r1", [[4]], spec.block_bytes, spec, exclusive=True, wait=0.05)


def test_a_waiting_claim_is_refused_when_the_push_before_it_was_the_last() -> None:
    table, spec = _table()
    first = table.claim("r1", [[3]], spec.block_bytes, spec, exclusive=True)
    errors: list[BaseException] = []

    def second() -> None:
        try:
            table.claim("r1", [[4]], spec.block_bytes, spec, exclusive=True, wait=WAIT_S)
        except KVTransferError as e:
            errors.append(e)

    thread = threading.Thread(target=second)
    thread.start()
    table.unclaim(first, done=True)  # that push was the request's last chunk: the hold is not servable
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert len(errors) == 1 and "not held here any more" in str(errors[0])
