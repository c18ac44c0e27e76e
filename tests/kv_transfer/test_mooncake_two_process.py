"""Real Mooncake (TransferEngine over TCP, P2P handshake) between connectors in separate processes.

Push (the default: the decode announces its blocks on the authenticated side channel, the prefill's
sender pool WRITEs them) and pull (the decode READs): exact bytes for non-contiguous, many-block,
one-block and 1-token prompts; verify_kv catches a corrupted block; an unread hold expires at its
lease; P1/D2 and P2/D1 move each rank's heads.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.kv_transfer.params import PrefillAnswer, RemoteDecodeRequest
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.mooncake_skip import requires_mooncake
from tests.kv_transfer.pd_procs import ConnectorProcess, tp_prefill_answer

pytestmark = [pytest.mark.e2e, requires_mooncake]

BLOCK_SIZE = 4
GROUPS = 2
SPEC = dict(block_size=BLOCK_SIZE, groups=GROUPS, num_blocks=24)


def _config(mode: str, lease: float = 60.0) -> DeploymentConfig:
    kv = KVTransferConfig(connector="mooncake", transfer_mode=mode, verify_kv=True, handshake_timeout_seconds=5.0,
                          transfer_timeout_seconds=30.0, kv_lease_seconds=lease, engine_id="unused")
    return secured(DeploymentConfig(device="cpu", kv_transfer=kv))


@pytest.fixture(scope="module", params=["auto", "pull"], ids=["push", "pull"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[ConnectorProcess, ConnectorProcess]]:
    config = _config(request.param)
    prefill = ConnectorProcess(config, InstanceSpec(role="prefill", port=1, engine_id="mc-P", device="cpu"),
                               seed=1, **SPEC)
    try:
        decode = ConnectorProcess(config, InstanceSpec(role="decode", port=2, engine_id="mc-D", device="cpu"),
                                  seed=2, **SPEC)
        try:
            assert decode.info["connector"] == "mooncake" and decode.info["transport"] == "tcp"
            assert decode.info["transfer_mode"] == ("push" if request.param == "auto" else "pull")
            yield prefill, decode
        finally:
            decode.close()
    finally:
        prefill.close()


def _finish(prefill: ConnectorProcess, rid: str, prompt: list[int], ids: list[list[int]]) -> dict:
    hold, params = prefill.call("request_finished", rid, prompt, RemoteDecodeRequest(do_remote_decode=True), ids)
    assert hold is True and params.do_remote_prefill is True
    return params


def _move(pair, rid: str, n: int, p_ids: list[list[int]], d_ids: list[list[int]]) -> None:
    prefill, decode = pair
    prompt = list(range(100, 100 + n))
    before = [decode.call("blocks", g, d_ids[g]) for g in range(GROUPS)]
    params = _finish(prefill, rid, prompt, p_ids)
    external = decode.call("get_num_new_matched_tokens", rid, prompt, params, 0)
    assert external == n - 1
    decode.call("start_load", rid, prompt, params, d_ids, 0, external)
    ev = decode.wait_events(lambda e: rid in e.finished_recving or rid in e.failed_recving, what=f"load of {rid}")
    assert rid in ev.finished_recving, ev.failed_recving.get(rid)
    prefill.wait_events(lambda e: rid in e.finished_sending, what=f"prefill freeing {rid}")
    needed = set(range((n - 1 + BLOCK_SIZE - 1) // BLOCK_SIZE))
    for g in range(GROUPS):
        after, source = decode.call("blocks", g, d_ids[g]), prefill.call("blocks", g, p_ids[g])
        for i in range(len(d_ids[g])):
            assert torch.equal(after[i], source[i] if i in needed else before[g][i]), (g, i, i in needed)


def test_non_contiguous_blocks_move_exactly(pair) -> None:
    _move(pair, "r-noncontig", 17, [[5, 6, 7, 2, 9], [11, 12, 0, 1, 3]], [[3, 4, 10, 11, 20], [7, 8, 9, 15, 16]])


def test_many_blocks_and_bytes_metric(pair) -> None:
    _, decode = pair
    before = decode.call("metric", "KV_TRANSFER_BYTES")
    _move(pair, "r-many", 16 * BLOCK_SIZE, [list(range(4, 20)), list(range(0, 16))],
          [list(range(2, 18)), list(range(8, 24))])
    block_bytes = 2 * 2 * BLOCK_SIZE * 2 * 8 * 4  # layers * (k, v) * block_size * heads * head_dim * fp32
    assert decode.call("metric", "KV_TRANSFER_BYTES") - before == 16 * GROUPS * block_bytes


def test_exactly_one_block_prompt(pair) -> None:
    _move(pair, "r-oneblock", BLOCK_SIZE, [[13], [14]], [[21], [22]])


def test_one_token_prompt_still_frees_prefill(pair) -> None:
    _move(pair, "r-onetoken", 1, [[15], [16]], [[19], [18]])


def test_corrupted_transfer_is_caught_by_verify_kv(pair) -> None:
    prefill, decode = pair
    rid, prompt = "r-corrupt", list(range(9))
    params = _finish(prefill, rid, prompt, [[3, 4, 5], [6, 7, 8]])
    prefill.call("corrupt", 0, 4)  # after the checksum was taken
    decode.call("start_load", rid, prompt, params, [[9, 10, 11], [12, 13, 14]], 0, 8)
    ev = decode.wait_events(lambda e: rid in e.failed_recving or rid in e.finished_recving)
    assert "KV checksum mismatch" in ev.failed_recving[rid] and "group 0, local block 10" in ev.failed_recving[rid]
    prefill.wait_events(lambda e: rid in e.finished_sending, what="prefill freeing the corrupted request")


def test_unread_hold_expires_at_its_lease() -> None:
    prefill = ConnectorProcess(_config("auto", lease=1.0),
                               InstanceSpec(role="prefill", port=1, engine_id="mc-lease", device="cpu"), seed=3, **SPEC)
    try:
        _finish(prefill, "r-lease", list(range(9)), [[1, 2, 3], [4, 5, 6]])
        assert "r-lease" not in prefill.call("get_finished").finished_sending  # held within the lease
        prefill.wait_events(lambda e: "r-lease" in e.finished_sending, timeout=10.0, what="the lease to expire")
        assert prefill.call("metric", "KV_EXPIRED_REQUESTS") == 1
    finally:
        prefill.close()


# -- mixed TP (pull, kv_transfer/reshard.py) ------------------------------------------------------
PROMPT = list(range(100, 117))  # 17 tokens: 4 blocks per group move
P_IDS = [[3, 4, 9, 10, 11], [0, 1, 2, 7, 8]]
D_IDS = [[5, 6, 7, 1, 2], [10, 3, 4, 5, 6]]


def _ranks(role: str, tp: int, heads: int) -> list[ConnectorProcess]:
    procs: list[ConnectorProcess] = []
    try:
        for rank in range(tp):
            procs.append(ConnectorProcess(_config("auto"), InstanceSpec(role=role, port=1, engine_id=f"mc-{role}",
                                                                        device="cpu"),
                                          seed=10 * rank + len(role), num_kv_heads=heads, tp_size=tp, tp_rank=rank,
                                          **SPEC))
    except BaseException:
        for p in procs:
            p.close()
        raise
    return procs


def _tp_finish(prefill: list[ConnectorProcess], rid: str) -> PrefillAnswer:
    return tp_prefill_answer(prefill, rid, PROMPT, P_IDS)


def _load(decode: ConnectorProcess, rid: str, params: PrefillAnswer) -> None:
    decode.call("start_load", rid, PROMPT, params, D_IDS, 0,
                decode.call("get_num_new_matched_tokens", rid, PROMPT, params, 0))
    ev = decode.wait_events(lambda e: rid in e.finished_recving or rid in e.failed_recving, what=f"load of {rid}")
    assert rid in ev.finished_recving, ev.failed_recving


def test_p1_d2_each_decode_rank_reads_its_head(close_all: list[ConnectorProcess]) -> None:
    prefill = _ranks("prefill", 1, heads=2)
    close_all += prefill
    decode = _ranks("decode", 2, heads=1)
    close_all += decode
    params = _tp_finish(prefill, "r")
    _load(decode[0], "r", params)
    assert "r" not in prefill[0].call("get_finished").finished_sending  # one reader of two has read
    _load(decode[1], "r", params)
    prefill[0].wait_events(lambda e: "r" in e.finished_sending, what="prefill freeing r after both readers")
    for g in range(GROUPS):
        source = prefill[0].call("blocks", g, P_IDS[g][:4])
        for rank in range(2):
            got = decode[rank].call("blocks", g, D_IDS[g][:4])
            assert torch.equal(got, source[:, :, :, :, rank:rank + 1]), (g, rank)


def test_p2_d1_decode_gathers_heads_from_both_ranks(close_all: list[ConnectorProcess]) -> None:
    prefill = _ranks("prefill", 2, heads=1)
    close_all += prefill
    decode = _ranks("decode", 1, heads=2)
    close_all += decode
    _load(decode[0], "ok", _tp_finish(prefill, "ok"))
    for g in range(GROUPS):
        got = decode[0].call("blocks", g, D_IDS[g][:4])
        for rank in range(2):
            assert torch.equal(got[:, :, :, :, rank:rank + 1], prefill[rank].call("blocks", g, P_IDS[g][:4]))
    for p in prefill:
        p.wait_events(lambda e: "ok" in e.finished_sending, what="each prefill rank freeing ok")
