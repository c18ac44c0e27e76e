"""Real NIXL between connectors of different TP sizes, one process per rank (what each TP rank runs).

P1/D2 with a staging prefill (the CuMem path): both decode ranks READ the same prefill blocks and
keep their own head; the prefill side frees only after the second reader. P2/D1: decode gathers one
head from each prefill rank; a corrupted block on one rank fails the load (verify_kv) and both prefill
ranks still free the request.
"""

from __future__ import annotations

import pytest
import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.kv_transfer.params import PrefillAnswer
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.pd_procs import ConnectorProcess, tp_prefill_answer

BLOCK_SIZE = 4
SPEC = dict(block_size=BLOCK_SIZE, groups=2, num_blocks=24)
PROMPT = list(range(100, 117))  # 17 tokens: positions 0..15 move, 4 blocks per group
P_IDS = [[3, 4, 9, 10, 11], [0, 1, 2, 7, 8]]
D_IDS = [[5, 6, 7, 1, 2], [10, 3, 4, 5, 6]]


def _config() -> DeploymentConfig:
    kv = KVTransferConfig(transfer_mode="pull", verify_kv=True, handshake_timeout_seconds=3.0,
                          transfer_timeout_seconds=30.0, engine_id="unused")
    return secured(DeploymentConfig(device="cpu", kv_transfer=kv))


def _ranks(role: str, tp: int, heads: int, staging_slots: int = 0) -> list[ConnectorProcess]:
    engine = "engine-P" if role == "prefill" else "engine-D"
    procs: list[ConnectorProcess] = []
    try:
        for rank in range(tp):
            procs.append(ConnectorProcess(_config(), InstanceSpec(role=role, port=1, engine_id=engine, device="cpu"),
                                          staging_slots=staging_slots, seed=10 * rank + len(role), num_kv_heads=heads,
                                          tp_size=tp, tp_rank=rank, **SPEC))
    except BaseException:
        for p in procs:
            p.close()
        raise
    return procs


def _finish(prefill: list[ConnectorProcess], rid: str) -> PrefillAnswer:
    return tp_prefill_answer(prefill, rid, PROMPT, P_IDS)


def _load(decode: ConnectorProcess, rid: str, params: PrefillAnswer) -> None:
    external = decode.call("get_num_new_matched_tokens", rid, PROMPT, params, 0)
    decode.call("start_load", rid, PROMPT, params, D_IDS, 0, external)


def _heads(blocks: torch.Tensor, start: int, count: int) -> torch.Tensor:
    return blocks[:, :, :, :, start:start + count]


@pytest.mark.e2e
def test_decode_tp_larger_both_ranks_read_one_staging_prefill(close_all: list[ConnectorProcess]) -> None:
    prefill = _ranks("prefill", 1, heads=2, staging_slots=3)  # chunks of 3 of the 4 blocks
    close_all += prefill
    decode = _ranks("decode", 2, heads=1)
    close_all += decode
    params = _finish(prefill, "r")
    _load(decode[0], "r", params)
    ev = decode[0].wait_events(lambda e: "r" in e.finished_recving or "r" in e.failed_recving, what="rank 0 load")
    assert "r" in ev.finished_recving, ev.failed_recving
    for _ in range(20):  # one reader of two has reported: the blocks stay held
        assert "r" not in prefill[0].call("get_finished").finished_sending
    _load(decode[1], "r", params)
    ev = decode[1].wait_events(lambda e: "r" in e.finished_recving or "r" in e.failed_recving, what="rank 1 load")
    assert "r" in ev.finished_recving, ev.failed_recving
    prefill[0].wait_events(lambda e: "r" in e.finished_sending, what="prefill freeing r after both readers")
    for g in range(2):
        source = prefill[0].call("blocks", g, P_IDS[g][:4])
        for rank in range(2):
            assert torch.equal(decode[rank].call("blocks", g, D_IDS[g][:4]), _heads(source, rank, 1)), (g, rank)


@pytest.mark.e2e
def test_prefill_tp_larger_gathers_heads_and_frees_every_rank(close_all: list[ConnectorProcess]) -> None:
    prefill = _ranks("prefill", 2, heads=1)
    close_all += prefill
    decode = _ranks("decode", 1, heads=2)
    close_all += decode
    params = _finish(prefill, "ok")
    _load(decode[0], "ok", params)
    ev = decode[0].wait_events(lambda e: "ok" in e.finished_recving or "ok" in e.failed_recving, what="gather")
    assert "ok" in ev.finished_recving, ev.failed_recving
    for g in range(2):
        got = decode[0].call("blocks", g, D_IDS[g][:4])
        for rank in range(2):
            assert torch.equal(_heads(got, rank, 1), prefill[rank].call("blocks", g, P_IDS[g][:4])), (g, rank)
    for p in prefill:
        p.wait_events(lambda e: "ok" in e.finished_sending, what="prefill rank freeing ok")

    params = _finish(prefill, "bad")
    prefill[1].call("corrupt", 1, P_IDS[1][2])
    _load(decode[0], "bad", params)
    ev = decode[0].wait_events(lambda e: "bad" in e.failed_recving or "bad" in e.finished_recving, what="bad load")
    assert "KV checksum mismatch" in ev.failed_recving["bad"]
    for p in prefill:  # rank 0 got read_done (or release), rank 1 a release: neither waits for its lease
        p.wait_events(lambda e: "bad" in e.finished_sending, what="prefill rank freeing bad")
