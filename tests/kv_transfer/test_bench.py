"""The KV transfer benchmark runs the real connector path in both modes and checks the bytes it moved."""

from __future__ import annotations

import pytest

from pdlaunch.bench.kv_transfer import run_kv_transfer_bench
from pdlaunch.errors import PdlaunchError


@pytest.mark.e2e
def test_bench_rows_on_cpu() -> None:
    rows = run_kv_transfer_bench(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_size=8,
                                 num_tokens_list=[9, 65], modes=["pull", "push"], device="cpu", iterations=2)
    assert [(r["mode"], r["num_tokens"]) for r in rows] == [("pull", 9), ("pull", 65), ("push", 9), ("push", 65)]
    block_bytes = 2 * 2 * 8 * 2 * 16 * 4
    assert [r["bytes"] for r in rows] == [block_bytes, 8 * block_bytes] * 2
    for r in rows:
        assert r["verified"] is True and r["descriptors"] == 1
        assert r["gbps"] > 0 and r["raw_copy_gbps"] > 0 and r["peer_copy_gbps"] is None


@pytest.mark.e2e
def test_concurrent_requests_each_move_their_own_blocks() -> None:
    rows = run_kv_transfer_bench(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_size=8,
                                 num_tokens_list=[65], modes=["pull", "push"], device="cpu", iterations=2,
                                 concurrency=3)
    block_bytes = 2 * 2 * 8 * 2 * 16 * 4
    for r in rows:
        # all three requests' blocks (8 each, disjoint) arrived as the prefill holds them
        assert r["concurrency"] == 3 and r["bytes"] == 3 * 8 * block_bytes and r["verified"] is True
        assert r["push_phases_ms"] is None  # phases are one request's, given at concurrency 1 only


def test_a_concurrency_below_one_is_refused() -> None:
    with pytest.raises(PdlaunchError) as info:
        run_kv_transfer_bench(device="cpu", concurrency=0)
    assert info.value.field == "--concurrency" and info.value.message == "0 is below 1"  # the flag said once
