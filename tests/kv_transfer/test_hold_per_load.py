"""A hold counts READ claims and read_done/release notifications per decode load (its engine id and load id), not
per decode engine: the same signed params loaded twice on one decode (a client sending its params again, a leg
retried on the same decode) are two loads. Before, the first load's release (its client left) or read_done ended
the hold while the second load's claimed READ still ran: the blocks went back to the free list, another prompt
could take them, and that READ loaded another prompt's KV (verify_kv is off by default).

A load's `readers` (its ranks that each notify, when resharding) is fixed by its first notification: one that named
more, merged with max before, kept the hold to its cap. A load counts no notification once all of its are in, so
the release nonces a hold keeps are at most its loads' `readers`, and a hold takes at most MAX_LOADS_PER_HOLD loads.
"""

from __future__ import annotations

import logging
import time

import pytest
from pydantic import JsonValue

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.decode.load import Load, load_id
from pdlaunch.kv_transfer.messages import ClaimReadRequest, Empty, ReleaseRequest
from pdlaunch.kv_transfer.notifications import ReadDone
from pdlaunch.kv_transfer.prefill.hold import MAX_LOADS_PER_HOLD
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.side_channel.client import call
from pdlaunch.kv_transfer.side_channel.server import SideChannelServer
from tests.kv_transfer.deployment_secret import KEYS

LEASE_S = 60.0  # far longer than any test here: a hold freed within one was freed by a notification
DECODE = "decode-engine"
FIRST, SECOND = load_id("cmpl-a-1f2e3d4c"), load_id("cmpl-a-5b6a7980")  # one client's params, sent twice


def _claim(holds: HoldTable, load: str, reader: str = DECODE) -> Empty:
    return holds.claim_read(ClaimReadRequest(type="claim_read", request_id="p-1", seconds=30.0, reader=reader,
                                             load=load))


def _release(holds: HoldTable, load: str, nonce: str, readers: int = 1) -> None:
    holds.on_release(ReleaseRequest(type="release", request_id="p-1", reader=DECODE, load=load, readers=readers,
                                    nonce=nonce))


def _notify(holds: HoldTable, kind: str, load: str, readers: int = 1) -> None:
    holds.on_read_done(ReadDone(kind=kind, request_id="p-1", reader=DECODE, load=load,  # type: ignore[arg-type]
                                readers=readers))


def _held() -> HoldTable:
    holds = HoldTable(lease_seconds=LEASE_S)
    holds.hold("p-1", [[3, 4]])
    return holds


@pytest.mark.parametrize("ends", ["side-channel release", "release", "read_done"])
def test_one_loads_end_keeps_the_hold_another_load_of_the_same_decode_reads(ends: str) -> None:
    holds = _held()
    assert _claim(holds, FIRST) == _claim(holds, SECOND) == Empty()
    if ends == "side-channel release":
        _release(holds, FIRST, "n1")
    else:
        _notify(holds, ends, FIRST)
    assert holds.poll(time.monotonic()) == set(), "freed while the second load's claimed READ runs"
    assert not holds.release("p-1"), "the proxy's release ended a hold under a claimed READ"
    _notify(holds, "read_done", SECOND)
    assert holds.poll(time.monotonic()) == {"p-1"}
    assert _claim(holds, SECOND) == Empty(), "the second load READ the blocks while they were held"


def test_a_load_that_claims_after_another_load_of_its_decode_ended_the_hold_is_refused() -> None:
    """The first load read the blocks and said so: the hold ends. The second load (same decode, same params) claims
    after: its READ may see blocks another prompt reuses, so it fails, before the poll frees them and after. The
    first load's own late claim is still answered: the blocks were held throughout its READ."""
    holds = _held()
    _notify(holds, "read_done", FIRST)
    refused = rf"read by another load of its params \(load {FIRST} of {DECODE}\) and its blocks freed"
    with pytest.raises(KVTransferError, match=refused):
        _claim(holds, SECOND)
    assert holds.poll(time.monotonic()) == {"p-1"}
    with pytest.raises(KVTransferError, match=refused):
        _claim(holds, SECOND)
    assert _claim(holds, FIRST) == Empty()


def test_a_refused_claim_says_what_each_load_failure_policy_does_then() -> None:
    """The prefill does not know the decode's kv_transfer.load_failure_policy: a refused claim names both outcomes
    (it said "this one computes the prompt itself", which under `fail` is not what happens: the request fails)."""
    holds = _held()
    _notify(holds, "read_done", FIRST)
    with pytest.raises(KVTransferError) as refused:
        _claim(holds, SECOND)
    loads = [load_id(f"cmpl-{n}") for n in range(MAX_LOADS_PER_HOLD + 1)]
    crowded = _held()
    for load in loads[:MAX_LOADS_PER_HOLD]:
        _claim(crowded, load)
    with pytest.raises(KVTransferError) as too_many:
        _claim(crowded, loads[-1])
    for error in (refused.value, too_many.value):
        assert "kv_transfer.load_failure_policy, recompute: the decode computes the prompt itself; fail: the " \
               "request fails" in str(error), error


def test_a_loads_readers_are_fixed_by_its_first_notification() -> None:
    """Decode TP 2 reads prefill TP 1: the load's two ranks each send one word (readers=2). A word that names more
    ranks than the first did changes nothing: the load is through at its second rank's word, not at the cap."""
    holds = _held()
    _claim(holds, FIRST)
    _release(holds, FIRST, "rank-0", readers=2)
    _release(holds, FIRST, "inflated", readers=1024)
    hold = holds.get("p-1")
    assert hold is not None and hold.readers == {(DECODE, FIRST): 2}
    assert holds.poll(time.monotonic()) == {"p-1"}, "the load's second word ends it, whatever count it names"

    holds = _held()
    _claim(holds, FIRST)
    _notify(holds, "release", FIRST, readers=2)
    _notify(holds, "read_done", FIRST, readers=1024)
    assert holds.poll(time.monotonic()) == {"p-1"}


def test_a_load_keeps_no_more_release_nonces_than_its_readers() -> None:
    holds = _held()
    _claim(holds, FIRST)
    _claim(holds, SECOND)  # keeps the hold while the first load's releases come in
    for n in range(100):
        _release(holds, FIRST, f"nonce-{n}", readers=2)
    hold = holds.get("p-1")
    assert hold is not None and hold.release_nonces == {(DECODE, FIRST): {"nonce-0", "nonce-1"}}
    assert hold.notified == {(DECODE, FIRST): 2}
    _release(holds, SECOND, "nonce-0")  # another load's nonce is its own
    assert holds.poll(time.monotonic()) == {"p-1"}


def test_a_hold_takes_a_bounded_number_of_loads(caplog: pytest.LogCaptureFixture) -> None:
    holds = _held()
    loads = [load_id(f"cmpl-{n}") for n in range(MAX_LOADS_PER_HOLD + 1)]
    for load in loads[:MAX_LOADS_PER_HOLD]:
        _claim(holds, load)
    with pytest.raises(KVTransferError, match=f"{MAX_LOADS_PER_HOLD} decode loads took its hold already"):
        _claim(holds, loads[-1])
    with caplog.at_level(logging.WARNING, logger="pdlaunch.kv_transfer.prefill.holds"):
        _release(holds, loads[-1], "n")
    hold = holds.get("p-1")
    assert hold is not None and (DECODE, loads[-1]) not in hold.notified and not hold.done
    assert f"not counted: {MAX_LOADS_PER_HOLD} loads took its hold already" in caplog.text
    for load in loads[:MAX_LOADS_PER_HOLD]:
        _notify(holds, "read_done", load)
    assert holds.poll(time.monotonic()) == {"p-1"}


def test_the_ranks_of_one_request_share_a_load_id_two_requests_do_not() -> None:
    """A decode's TP ranks each plan their own Load of the engine's request (each with its own nonce): they name one
    load, whose hold waits for each rank's word. The same params in two requests are two loads."""
    remote = RemoteKV(engine_id="P", request_id="p-1", host="127.0.0.1", port=1, block_ids=[[3]])
    rank0, rank1, other = (Load(rid, remote, [], deadline=0.0, started=0.0) for rid in ("r-1", "r-1", "r-2"))
    assert rank0.nonce != rank1.nonce and rank0.load_id == rank1.load_id == load_id("r-1") != other.load_id
    assert len(rank0.load_id) == 32


@pytest.mark.parametrize("message", [
    {"type": "claim_read", "request_id": "p-1", "seconds": 1.0, "reader": DECODE},
    {"type": "release", "request_id": "p-1", "reader": DECODE, "nonce": "n"},
    {"type": "stage", "request_id": "p-1", "blocks": [[3]], "reader": DECODE, "seconds": 1.0},
], ids=["claim_read", "release", "stage"])
def test_a_message_without_its_load_is_refused_naming_the_fix(message: dict[str, JsonValue]) -> None:
    server = SideChannelServer("127.0.0.1", 0, {}, KEYS)
    refused = (rf"invalid side-channel message: msg\.{message['type']}\.load: .*load \(the id of the decode's load\) "
               r"is missing: the decode runs an older pdlaunch; run the same pdlaunch version on prefill and decode")
    try:
        with pytest.raises(KVTransferError, match=refused):
            call("127.0.0.1", server.port, message, 5, "old decode", KEYS)
    finally:
        server.close()
