"""TPConnector lets go of a failed or aborted load's per-rank reports once no rank loads or drains it: a decode
whose loads keep failing (a prefill that is down, load_failure_policy recompute) must not grow with every request,
and a load is still reported done only when every rank reported it."""

from __future__ import annotations

from pdlaunch.kv_transfer.base import KVConnectorEvents
from tests.tp.test_tp_connector_drain import ScriptedRank, pair


def test_failed_and_aborted_loads_are_not_kept() -> None:
    rank0, rank1 = ScriptedRank(), ScriptedRank()
    tp = pair(rank0, rank1)
    for i in range(1000):
        rid = f"req-{i}"
        tp.start_load(rid, [1, 2, 3], None, [[0]], 0, 3)
        rank0.queue = [KVConnectorEvents(failed_recving={rid: "prefill down"})]
        assert rid in tp.get_finished().failed_recving
        assert tp.get_finished() == KVConnectorEvents()  # later steps: nothing more about it
    for i in range(1000):
        rid = f"ab-{i}"
        tp.start_load(rid, [1, 2, 3], None, [[0]], 0, 3)
        rank1.queue = [KVConnectorEvents(finished_recving={rid})]  # rank 1 done, rank 0 still loading
        assert tp.get_finished() == KVConnectorEvents()
        assert tp.abort_load(rid) is False  # the client left: the scheduler drops the request
        assert tp.get_finished() == KVConnectorEvents()
    assert tp.events.num_tracked() == 0


def test_a_failed_load_drops_late_reports_until_no_rank_drains_it() -> None:
    rank0, rank1 = ScriptedRank(), ScriptedRank(busy_on_abort=True)
    tp = pair(rank0, rank1)
    tp.start_load("r", [1, 2, 3], None, [[0]], 0, 3)
    rank0.queue = [KVConnectorEvents(failed_recving={"r": "timeout"})]
    first = tp.get_finished()
    assert "r" in first.failed_recving and first.draining == {"r"}  # rank 1 may still be written
    rank1.queue = [KVConnectorEvents(finished_recving={"r"}), KVConnectorEvents(failed_recving={"r": "late"}),
                   KVConnectorEvents(safe_to_free={"r"})]
    assert tp.get_finished() == KVConnectorEvents()  # rank 1's late report: neither done nor failed again
    assert tp.get_finished() == KVConnectorEvents()
    assert tp.events.num_tracked() == 1
    assert tp.get_finished().safe_to_free == {"r"}
    assert tp.events.num_tracked() == 0


def test_an_aborted_load_is_not_done_when_the_rest_of_the_ranks_report_later() -> None:
    rank0, rank1 = ScriptedRank(), ScriptedRank()
    tp = pair(rank0, rank1)
    tp.start_load("a", [1, 2, 3], None, [[0]], 0, 3)
    rank1.queue = [KVConnectorEvents(finished_recving={"a"})]
    tp.get_finished()
    tp.abort_load("a")
    rank0.queue = [KVConnectorEvents(finished_recving={"a"})]  # a rank that reports its aborted load anyway
    assert tp.get_finished().finished_recving == set()


def test_a_load_is_done_only_when_every_rank_reported_it() -> None:
    rank0, rank1 = ScriptedRank(), ScriptedRank()
    tp = pair(rank0, rank1)
    tp.start_load("d", [1, 2, 3], None, [[0]], 0, 3)
    rank0.queue = [KVConnectorEvents(finished_recving={"d"})]
    assert tp.get_finished().finished_recving == set()
    assert tp.events.num_tracked() == 1
    rank1.queue = [KVConnectorEvents(finished_recving={"d"})]
    assert tp.get_finished().finished_recving == {"d"}
    assert tp.events.num_tracked() == 0
