"""Resharding plans (which prefill rank supplies which KV heads) and the head-slice copy, without NIXL.

The end-to-end check per (K, Tp, Td): split one KV cache the way TP ranks hold it (model/parallel_linear.py),
then rebuild every decode rank's slice through staging slots shaped like a prefill block, following
the plan, and compare with the decode rank's own split.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.decode.reshard_load import copy_head_slices
from pdlaunch.kv_transfer.params import PrefillAnswer
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.reshard import (
    HeadSlice,
    kv_head_range,
    notifying_ranks,
    plan_head_slices,
    plan_reshard,
    total_kv_heads,
)
from pdlaunch.kv_transfer.staging import StagingArea

NUM_BLOCKS, LAYERS, BLOCK_SIZE, HEAD_DIM = 6, 2, 4, 3


def rank_slice(full: torch.Tensor, rank: int, tp: int, total: int) -> torch.Tensor:
    """What rank `rank` of a TP-`tp` instance holds of `full` ([blocks, layers, 2, B, K, D])."""
    start, count = kv_head_range(rank, tp, total)
    return full[:, :, :, :, start:start + count].contiguous()


def valid_splits() -> list[tuple[int, int, int]]:
    out = []
    for total, tp_p, tp_d in itertools.product((1, 2, 4), (1, 2, 4, 8), (1, 2, 4, 8)):
        ok = all(tp % total == 0 or total % tp == 0 for tp in (tp_p, tp_d))
        if ok and tp_p != tp_d and (tp_p % tp_d == 0 or tp_d % tp_p == 0):
            out.append((total, tp_p, tp_d))
    return out


@pytest.mark.parametrize("total,tp_p,tp_d", valid_splits())
def test_every_decode_rank_rebuilds_its_heads_from_the_plan(total: int, tp_p: int, tp_d: int) -> None:
    full = torch.randn(NUM_BLOCKS, LAYERS, 2, BLOCK_SIZE, total, HEAD_DIM)
    prefill = [rank_slice(full, p, tp_p, total) for p in range(tp_p)]
    heads_p, heads_d = prefill[0].shape[4], max(1, total // tp_d)
    inferred = total_kv_heads(tp_p, heads_p, tp_d, heads_d)
    local_ids, remote_ids = [4, 5, 0], [1, 2, 3]
    readers = {p: 0 for p in range(tp_p)}
    for r in range(tp_d):
        params = PrefillAnswer(do_remote_prefill=True, remote_request_id="r", tp_size=tp_p, kv_heads_per_rank=heads_p,
                               remote_ports=list(range(9000, 9000 + tp_p)), remote_port=9000, remote_engine_id="P",
                               remote_host="h", rank_kv_checksums=[[[f"p{p}"]] for p in range(tp_p)])
        plan = plan_reshard(RemoteKV.from_params(params), r, tp_d, heads_d)
        mine = torch.zeros(NUM_BLOCKS, LAYERS, 2, BLOCK_SIZE, heads_d, HEAD_DIM)
        area = StagingArea([mine], 1 << 20, kv_heads=heads_p)
        for src in plan.sources:
            assert src.remote.port == 9000 + src.rank and src.checksums == [[f"p{src.rank}"]]
            assert src.remote.tp_rank == src.rank and src.remote.checksums is None
            assert src.readers == len(notifying_ranks(tp_d, tp_p, inferred)[src.rank])
            readers[src.rank] += 1
            if not src.slices:
                continue
            slots = area.acquire(len(remote_ids), 1.0)
            area.buffers[0][slots] = prefill[src.rank][remote_ids]  # what the READ brings
            copy_head_slices([mine], area, [local_ids], [slots], src.slices)
            area.release(slots)
        assert torch.equal(mine[local_ids], rank_slice(full, r, tp_d, total)[remote_ids]), f"decode rank {r}"
        assert not mine[[1, 2, 3]].any()  # blocks outside the load untouched
    # every prefill rank hears from exactly as many decode ranks as each notification says
    for p, count in readers.items():
        assert count == len(notifying_ranks(tp_d, tp_p, inferred)[p]) >= 1


def test_decode_tp_larger_reads_the_prefill_rank_holding_its_heads() -> None:
    # 4 KV heads, P2/D4: decode rank r reads prefill rank r // 2, head r % 2; two readers per prefill rank
    assert [plan_head_slices(r, 4, 2, 4) for r in range(4)] == [
        [HeadSlice(0, 0, 0, 1)], [HeadSlice(0, 1, 0, 1)], [HeadSlice(1, 0, 0, 1)], [HeadSlice(1, 1, 0, 1)]]
    assert notifying_ranks(4, 2, 4) == {0: [0, 1], 1: [2, 3]}


def test_prefill_tp_larger_gathers_and_tells_unread_replicas() -> None:
    # 4 KV heads, P4/D1: one decode rank gathers heads 0..3 from all four ranks
    assert plan_head_slices(0, 1, 4, 4) == [HeadSlice(p, 0, p, 1) for p in range(4)]
    # 1 KV head replicated on P2: decode reads rank 0 only, and tells rank 1 it may free
    assert plan_head_slices(0, 1, 2, 1) == [HeadSlice(0, 0, 0, 1)]
    assert notifying_ranks(1, 2, 1) == {0: [0], 1: [0]}


def test_inconsistent_head_counts_are_refused() -> None:
    with pytest.raises(KVTransferError, match="KV heads cannot be mapped"):
        total_kv_heads(2, 2, 1, 2)  # prefill says 4 heads in all, decode 2
    with pytest.raises(KVTransferError, match="kv_heads_per_rank"):
        plan_reshard(RemoteKV(engine_id="P", request_id="r", host="h", port=1, tp_size=2, rank_ports=[1, 2]), 0, 1, 2)
    with pytest.raises(KVTransferError, match="1 side-channel ports for TP 2"):
        plan_reshard(RemoteKV(engine_id="P", request_id="r", host="h", port=1, tp_size=2, kv_heads_per_rank=1), 0, 1, 2)
