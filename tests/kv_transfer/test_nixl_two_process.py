"""Real NIXL (UCX over DRAM) between a prefill and a decode connector in two processes, pull and push."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.kv_transfer.params import PrefillAnswer, RemoteDecodeRequest
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.pd_procs import ConnectorProcess

pytestmark = pytest.mark.slow  # each setup starts a prefill and a decode process with NIXL agents

BLOCK_SIZE = 4
GROUPS = 2


def _config(mode: str) -> DeploymentConfig:
    kv = KVTransferConfig(transfer_mode=mode, verify_kv=True, handshake_timeout_seconds=3.0,
                          transfer_timeout_seconds=30.0, engine_id="unused")
    return secured(DeploymentConfig(device="cpu", kv_transfer=kv))


# (mode, prefill staging slots, decode staging slots): 0 = the KV cache itself is registered; staging
# (what CuMem KV caches use on CUDA) with fewer slots than a request's blocks moves it in chunks.
SETUPS = [("pull", 0, 0), ("push", 0, 0), ("pull", 3, 2), ("push", 2, 0), ("push", 0, 3)]


@pytest.fixture(scope="module", params=SETUPS, ids=lambda s: f"{s[0]}-stage{s[1]}x{s[2]}")
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[ConnectorProcess, ConnectorProcess]]:
    mode, prefill_slots, decode_slots = request.param
    config = _config(mode)
    spec = dict(block_size=BLOCK_SIZE, groups=GROUPS, num_blocks=24)
    prefill = ConnectorProcess(config, InstanceSpec(role="prefill", port=1, engine_id="engine-P", device="cpu"),
                               staging_slots=prefill_slots, seed=1, **spec)
    decode = None
    try:
        decode = ConnectorProcess(config, InstanceSpec(role="decode", port=2, engine_id="engine-D", device="cpu"),
                                  staging_slots=decode_slots, seed=2, **spec)
        for side, slots in ((prefill, prefill_slots), (decode, decode_slots)):
            assert (side.info["staging"] or {"slots": 0})["slots"] == slots
        yield prefill, decode
    finally:
        prefill.close()
        if decode is not None:
            decode.close()


def _prefill_finish(prefill: ConnectorProcess, rid: str, prompt: list[int], ids: list[list[int]]) -> PrefillAnswer:
    hold, params = prefill.call("request_finished", rid, prompt, RemoteDecodeRequest(do_remote_decode=True), ids)
    assert hold is True
    assert params.do_remote_prefill is True and params.do_remote_decode is False
    assert params.remote_engine_id == "engine-P" and params.remote_request_id == rid
    assert params.remote_block_ids == ids and params.num_prompt_tokens == len(prompt)
    return params


def _move(pair, rid: str, n: int, p_ids: list[list[int]], d_ids: list[list[int]], k: int = 0) -> None:
    """Prefill finishes an n-token prompt; decode (k tokens cached locally) loads the rest; compare bytes."""
    prefill, decode = pair
    prompt = list(range(100, 100 + n))
    before = [decode.call("blocks", g, d_ids[g]) for g in range(GROUPS)]
    params = _prefill_finish(prefill, rid, prompt, p_ids)
    external = decode.call("get_num_new_matched_tokens", rid, prompt, params, k)
    assert external == max(0, n - 1 - k)
    decode.call("start_load", rid, prompt, params, d_ids, k, external)
    ev = decode.wait_events(lambda e: rid in e.finished_recving or rid in e.failed_recving, what=f"load of {rid}")
    assert rid in ev.finished_recving, ev.failed_recving.get(rid)
    prefill.wait_events(lambda e: rid in e.finished_sending, what=f"prefill freeing {rid}")
    needed = set(range(k // BLOCK_SIZE, (n - 1 + BLOCK_SIZE - 1) // BLOCK_SIZE)) if n - 1 > k else set()
    for g in range(GROUPS):
        after = decode.call("blocks", g, d_ids[g])
        source = prefill.call("blocks", g, p_ids[g])
        for i in range(len(d_ids[g])):
            expected = source[i] if i in needed else before[g][i]
            assert torch.equal(after[i], expected), f"group {g} block-table index {i} (needed: {i in needed})"


def test_non_contiguous_blocks_move_exactly(pair) -> None:
    # 17 tokens -> positions 0..15 move = 4 blocks; runs on both sides split differently.
    p_ids = [[5, 6, 7, 2, 9], [11, 12, 0, 1, 3]]
    d_ids = [[3, 4, 10, 11, 20], [7, 8, 9, 15, 16]]
    _move(pair, "r-noncontig", 17, p_ids, d_ids)


def test_contiguous_many_blocks(pair) -> None:
    p_ids = [list(range(4, 20)), list(range(0, 16))]
    d_ids = [list(range(2, 18)), list(range(8, 24))]
    _move(pair, "r-many", 16 * BLOCK_SIZE, p_ids, d_ids)


def test_exactly_one_block_prompt(pair) -> None:
    _move(pair, "r-oneblock", BLOCK_SIZE, [[13], [14]], [[21], [22]])


def test_one_token_prompt_still_frees_prefill(pair) -> None:
    _move(pair, "r-onetoken", 1, [[15], [16]], [[19], [18]])


def test_decode_prefix_hit_skips_blocks(pair) -> None:
    _move(pair, "r-prefix", 11, [[1, 2, 3], [4, 5, 6]], [[12, 13, 14], [15, 16, 17]], k=2 * BLOCK_SIZE)


def test_full_local_hit_moves_nothing(pair) -> None:
    _move(pair, "r-fullhit", 9, [[7, 8, 9], [10, 11, 12]], [[1, 2, 3], [4, 5, 6]], k=8)


def test_corrupted_transfer_is_caught_by_verify_kv(pair) -> None:
    prefill, decode = pair
    rid, prompt = "r-corrupt", list(range(9))
    params = _prefill_finish(prefill, rid, prompt, [[3, 4, 5], [6, 7, 8]])
    prefill.call("corrupt", 0, 4)  # after the checksum was taken
    external = decode.call("get_num_new_matched_tokens", rid, prompt, params, 0)
    decode.call("start_load", rid, prompt, params, [[9, 10, 11], [12, 13, 14]], 0, external)
    ev = decode.wait_events(lambda e: rid in e.failed_recving or rid in e.finished_recving)
    assert "KV checksum mismatch" in ev.failed_recving[rid]
    assert "group 0, local block 10" in ev.failed_recving[rid]
    prefill.wait_events(lambda e: rid in e.finished_sending)


def _handshake_only(request: pytest.FixtureRequest) -> None:
    """Handshake failures happen before any block moves: staging setups add nothing there."""
    if request.node.callspec.params["pair"] not in SETUPS[:2]:
        pytest.skip("handshake behaviour does not depend on staging")


def test_engine_id_mismatch_fails_the_request(pair, request: pytest.FixtureRequest) -> None:
    _handshake_only(request)
    prefill, decode = pair
    rid, prompt = "r-mismatch", list(range(6))
    params = _prefill_finish(prefill, rid, prompt, [[20, 21], [20, 21]])
    params = params.model_copy(update={"remote_engine_id": "engine-X"})
    decode.call("start_load", rid, prompt, params, [[1, 2], [1, 2]], 0, 5)
    ev = decode.wait_events(lambda e: rid in e.failed_recving)
    message = ev.failed_recving[rid]
    assert "engine_id mismatch" in message and "engine-X" in message and "engine-P" in message


def test_handshake_timeout_when_nobody_listens(pair, request: pytest.FixtureRequest) -> None:
    _handshake_only(request)
    _, decode = pair
    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = PrefillAnswer(do_remote_prefill=True, remote_engine_id="engine-gone", remote_block_ids=[[1], [1]],
                           remote_host="127.0.0.1", remote_port=port, remote_request_id="x", num_prompt_tokens=3)
    decode.call("start_load", "r-timeout", [1, 2, 3], params, [[2], [2]], 0, 2)
    ev = decode.wait_events(lambda e: "r-timeout" in e.failed_recving)
    message = ev.failed_recving["r-timeout"]
    assert "KV handshake with prefill engine engine-gone" in message and "within 3s" in message
    assert f"127.0.0.1:{port}" in message
    failures = decode.call("metric", "KV_TRANSFER_FAILURES")
    assert failures >= 1


def test_metrics_count_moved_bytes(pair) -> None:
    _, decode = pair
    before = decode.call("metric", "KV_TRANSFER_BYTES")
    _move(pair, "r-bytes", 9, [[0, 1, 2], [0, 1, 2]], [[5, 6, 7], [5, 6, 7]])
    block_bytes = 2 * 2 * BLOCK_SIZE * 2 * 8 * 4  # layers * (k, v) * block_size * heads * head_dim * fp32
    assert decode.call("metric", "KV_TRANSFER_BYTES") - before == 2 * GROUPS * block_bytes
