"""Rank 0 of a TP decode counts the group's KV transfer series from what each rank reports of its loads
(KVConnectorEvents.load_outcomes): the bytes of every rank once the request's KV is in on all of them, and a failure
once per request, whichever rank failed. Ranks 1..T-1 run in worker processes whose series nobody serves: a TP-2
decode's bytes read half of what moved, and a load that failed only on rank 1 was never counted (rank 0 only
aborted its own part, and an abort counts nothing)."""

from __future__ import annotations

import pytest

from pdlaunch.kv_transfer.base import KVConnectorEvents, LoadOutcome
from pdlaunch.kv_transfer.params import PrefillAnswer
from pdlaunch.metrics.kv_transfer import KV_TRANSFER_BYTES, KV_TRANSFER_FAILURES, KV_TRANSFER_SECONDS
from pdlaunch.metrics.vllm_series import NIXL_BYTES_TRANSFERRED, NIXL_NUM_FAILED_TRANSFERS, NIXL_XFER_TIME, vllm
from tests.tp.test_tp_connector_drain import ScriptedRank, pair


def _series() -> dict[str, float]:
    xfer, moved = vllm(NIXL_XFER_TIME), vllm(NIXL_BYTES_TRANSFERRED)
    return {
        "bytes": KV_TRANSFER_BYTES._value.get(),
        "seconds": KV_TRANSFER_SECONDS._sum.get(),
        "loads": sum(b.get() for b in KV_TRANSFER_SECONDS._buckets),
        "failures": KV_TRANSFER_FAILURES._value.get(),
        "vllm_bytes": moved._sum.get(),
        "vllm_xfer": xfer._sum.get(),
        "vllm_transfers": sum(b.get() for b in xfer._buckets),
        "vllm_failures": vllm(NIXL_NUM_FAILED_TRANSFERS)._value.get(),
    }


def _delta(before: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before[k], 6) for k, v in _series().items() if v != before[k]}


def _done(num_bytes: int, load_s: float, xfer_s: float | None) -> LoadOutcome:
    return LoadOutcome("done", num_bytes, load_s, xfer_s)


def test_a_load_done_on_every_rank_counts_their_bytes_once() -> None:
    rank0, rank1 = ScriptedRank(), ScriptedRank()
    tp = pair(rank0, rank1)
    tp.start_load("d", [1, 2, 3], None, [[0]], 0, 3)
    before = _series()
    rank1.queue = [KVConnectorEvents(finished_recving={"d"}, load_outcomes={"d": _done(3000, 0.75, 0.25)})]
    assert tp.get_finished().finished_recving == set()
    assert _delta(before) == {}  # rank 0 still loads its share
    rank0.queue = [KVConnectorEvents(finished_recving={"d"}, load_outcomes={"d": _done(1000, 0.5, 0.125)})]
    assert tp.get_finished().finished_recving == {"d"}
    assert _delta(before) == {
        "bytes": 4000,
        "seconds": 0.75,
        "loads": 1,  # the slowest rank's times
        "vllm_bytes": 4000,
        "vllm_xfer": 0.25,
        "vllm_transfers": 1,
    }
    assert tp.loads.num_tracked() == 0


def test_a_load_that_fails_only_on_rank_1_counts_one_failure() -> None:
    rank0, rank1 = ScriptedRank(), ScriptedRank()
    tp = pair(rank0, rank1)
    tp.start_load("f", [1, 2, 3], None, [[0]], 0, 3)
    before = _series()
    rank1.queue = [KVConnectorEvents(failed_recving={"f": "READ failed"}, load_outcomes={"f": LoadOutcome("failed")})]
    assert "f" in tp.get_finished().failed_recving
    assert rank0.aborted == ["f"]  # rank 0 stops its part: its load ends aborted, which counts nothing
    rank0.queue = [KVConnectorEvents(load_outcomes={"f": LoadOutcome("aborted")})]
    tp.get_finished()
    assert _delta(before) == {"failures": 1, "vllm_failures": 1}
    assert tp.loads.num_tracked() == 0


def test_a_load_that_fails_on_both_ranks_counts_one_failure() -> None:
    rank0, rank1 = ScriptedRank(), ScriptedRank()
    tp = pair(rank0, rank1)
    tp.start_load("b", [1, 2, 3], None, [[0]], 0, 3)
    before = _series()
    for rank in (rank0, rank1):  # the prefill died: each rank's READ failed before rank 0 heard of the other
        rank.queue = [KVConnectorEvents(failed_recving={"b": "peer gone"}, load_outcomes={"b": LoadOutcome("failed")})]
    assert "b" in tp.get_finished().failed_recving
    assert _delta(before) == {"failures": 1, "vllm_failures": 1}
    assert tp.loads.num_tracked() == 0


def test_a_load_aborted_with_one_rank_done_counts_nothing() -> None:
    rank0, rank1 = ScriptedRank(), ScriptedRank()
    tp = pair(rank0, rank1)
    tp.start_load("a", [1, 2, 3], None, [[0]], 0, 3)
    before = _series()
    rank0.queue = [KVConnectorEvents(finished_recving={"a"}, load_outcomes={"a": _done(1000, 0.5, 0.1)})]
    tp.get_finished()
    assert tp.abort_load("a") is False  # the client left
    rank1.queue = [KVConnectorEvents(load_outcomes={"a": LoadOutcome("aborted")})]
    tp.get_finished()
    assert _delta(before) == {}
    assert tp.loads.num_tracked() == 0


def test_params_no_rank_can_load_count_one_failure() -> None:
    rank0, rank1 = ScriptedRank(), ScriptedRank()
    tp = pair(rank0, rank1)
    spanning = PrefillAnswer(
        do_remote_prefill=True,
        remote_engine_id="P",
        remote_request_id="p-1",
        remote_block_ids=[[1]],
        remote_host="10.0.0.1",
        remote_port=1,
        tp_size=4,
        remote_ports=[1, 2, 3, 4],
        remote_hosts=["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"],
    )
    before = _series()
    tp.start_load("s", [1, 2, 3], spanning, [[0]], 0, 3)
    assert "spans nodes" in tp.get_finished().failed_recving["s"]
    assert _delta(before) == {"failures": 1, "vllm_failures": 1}


@pytest.mark.parametrize("outcome", [LoadOutcome("done", 10, 0.5, None), LoadOutcome("done", 10, 0.5, 0.25)])
def test_many_loads_leave_nothing_tracked(outcome: LoadOutcome) -> None:
    rank0, rank1 = ScriptedRank(), ScriptedRank()
    tp = pair(rank0, rank1)
    for i in range(200):
        rid = f"r{i}"
        tp.start_load(rid, [1, 2, 3], None, [[0]], 0, 3)
        for rank in (rank0, rank1):
            rank.queue = [KVConnectorEvents(finished_recving={rid}, load_outcomes={rid: outcome})]
        assert tp.get_finished().finished_recving == {rid}
    assert tp.loads.num_tracked() == 0 and tp.events.num_tracked() == 0
