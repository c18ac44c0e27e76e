"""A TP decode request that ended before its load started: every rank tells the prefill rank it would have read
(its own rank's side channel, as params_for_rank names it), so each prefill rank drops its slice's hold."""

from __future__ import annotations

from typing import Any

from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer
from tests.tp.test_tp_connector_drain import ScriptedRank, pair


class ReleasingRank(ScriptedRank):
    def __init__(self) -> None:
        super().__init__()
        self.released: list[tuple[str, KVTransferParams | None]] = []

    def release_unloaded(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: KVTransferParams | None) -> None:
        self.released.append((request_id, kv_transfer_params))


def _port(params: Any) -> int:
    assert isinstance(params, PrefillAnswer) and params.remote_port is not None
    return params.remote_port


def test_every_rank_tells_the_prefill_rank_it_would_have_read() -> None:
    rank0, rank1 = ReleasingRank(), ReleasingRank()
    tp = pair(rank0, rank1)
    params = PrefillAnswer(do_remote_prefill=True, remote_engine_id="p", remote_request_id="p-r", tp_size=2,
                           remote_host="a", remote_port=5600, remote_ports=[5600, 5601], remote_hosts=["a", "b"],
                           remote_block_ids=[[3, 4]])
    tp.release_unloaded("r", [1, 2, 3], params)
    assert [(rid, _port(p)) for rid, p in rank0.released] == [("r", 5600)]
    assert [(rid, _port(p)) for rid, p in rank1.released] == [("r", 5601)]


def test_params_no_rank_can_take_tell_no_prefill() -> None:
    rank0, rank1 = ReleasingRank(), ReleasingRank()
    tp = pair(rank0, rank1)
    # a prefill of another TP size that spans nodes: no rank can reshard from it (its load would have failed)
    params = PrefillAnswer(do_remote_prefill=True, remote_engine_id="p", remote_request_id="p-r", tp_size=4,
                           remote_host="a", remote_port=5600, remote_ports=[5600, 5601, 5602, 5603],
                           remote_hosts=["a", "a", "b", "b"], remote_block_ids=[[3, 4]])
    tp.release_unloaded("r", [1, 2, 3], params)
    assert rank0.released == rank1.released == []
