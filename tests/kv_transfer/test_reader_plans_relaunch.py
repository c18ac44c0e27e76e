"""A decode engine id that shakes hands again stating another KV heads split: a decode relaunched with another TP
size under the same engine_id (a multi-node launcher restarted with kv_transfer.engine_id set names its instances
"<base>-<name>" again, and no one told this prefill to forget the old one). Each load is counted against the plan of
the layout its own decode stated (prefill/reader_plans.py), never against the other incarnation's.

Before, the engine's first layout stood: the relaunched decode's two ranks both READ prefill rank 0, but the plan of
the old layout (TP 1) let the first rank's read_done free the blocks the second rank was still READing, which the
prefill then hands to other requests (a silently wrong KV load).

Prefill TP 1 with two KV heads; the old decode TP 1 (two heads per rank: one notification per load), the new one TP
2 (one head per rank: two).
"""

from __future__ import annotations

import logging
import time

import pytest

from pdlaunch.kv_transfer.messages import ClaimReadRequest, DecodeLayout
from pdlaunch.kv_transfer.notifications import ReadDone
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from tests.kv_transfer.pd_procs import make_spec

LEASE_S = 60.0  # far longer than any test here: a hold freed within one was freed by its notifications
DECODE = "base-decode-0"  # the same engine id before and after the relaunch
OLD = DecodeLayout(reader=DECODE, tp_size=1, kv_heads_per_rank=2)
NEW = DecodeLayout(reader=DECODE, tp_size=2, kv_heads_per_rank=1)
LOGGER = "pdlaunch.kv_transfer.prefill.reader_plans"


def _held(load: str, *layouts: DecodeLayout) -> HoldTable:
    """Prefill rank 0 of TP 1 holding p-1, claimed by `load` of DECODE, whose handshakes stated `layouts`."""
    holds = HoldTable(lease_seconds=LEASE_S)
    holds.plans.set_local(make_spec(num_kv_heads=2))
    for layout in layouts:
        holds.plans.learn(layout)
    holds.hold("p-1", [[3, 4]])
    holds.claim_read(ClaimReadRequest(type="claim_read", request_id="p-1", seconds=30.0, reader=DECODE, load=load))
    return holds


def _notify(holds: HoldTable, load: str, readers: int) -> None:
    holds.on_read_done(ReadDone(kind="read_done", request_id="p-1", reader=DECODE, load=load, readers=readers))


def _freed(holds: HoldTable) -> bool:
    return holds.poll(time.monotonic()) == {"p-1"}


def test_the_relaunched_decodes_load_waits_for_both_of_its_ranks(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        holds = _held("load-new", OLD, NEW)
    assert (f"decode engine {DECODE} shook hands stating TP 2 with 1 KV heads per rank, but it stated TP 1 with 2 "
            "before") in caplog.text
    _notify(holds, "load-new", readers=2)
    assert not _freed(holds), "freed at the first of two ranks' read_done: the second still READs those blocks"
    _notify(holds, "load-new", readers=2)
    assert _freed(holds)


def test_a_load_of_the_earlier_incarnation_still_ends_at_its_one_word() -> None:
    """Its decode had TP 1: its one rank's read_done ends the load (the hold is not kept to the READ claim's cap)."""
    holds = _held("load-old", OLD, NEW)
    _notify(holds, "load-old", readers=1)
    assert _freed(holds)


def test_a_count_neither_layout_gives_is_counted_toward_the_largest(caplog: pytest.LogCaptureFixture) -> None:
    holds = _held("load-new", OLD, NEW)
    with caplog.at_level(logging.WARNING, logger="pdlaunch.kv_transfer.prefill.holds"):
        _notify(holds, "load-new", readers=1024)
    assert not _freed(holds), "a word naming no layout's count must not free blocks early"
    assert "names readers=1024, but its handshakes' layouts" in caplog.text
    assert "counted as one of 2" in caplog.text
    _notify(holds, "load-new", readers=1024)
    assert _freed(holds)


def test_the_same_layout_stated_again_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        holds = _held("load-new", NEW, NEW, NEW)
    assert caplog.text == ""
    plan = holds.plans.plan(DECODE)
    assert plan is not None and plan.counts == frozenset({2})


def test_an_engine_keeps_its_latest_layouts_only() -> None:
    """What one engine id can make this rank keep is bounded; the layout its ranks state again stays."""
    from pdlaunch.kv_transfer.prefill.reader_plans import MAX_LAYOUTS_PER_ENGINE

    holds = HoldTable(lease_seconds=LEASE_S)
    holds.plans.set_local(make_spec(num_kv_heads=2))
    stated = [DecodeLayout(reader=DECODE, tp_size=4, kv_heads_per_rank=h) for h in range(1, 2 * MAX_LAYOUTS_PER_ENGINE)]
    for layout in [NEW, *stated, NEW]:
        holds.plans.learn(layout)
    assert holds.plans.layouts(DECODE) == [*stated[1 - MAX_LAYOUTS_PER_ENGINE:], NEW]
