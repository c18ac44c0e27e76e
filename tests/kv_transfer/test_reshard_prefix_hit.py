"""Decode-side prefix reuse through a resharding load (prefill TP 2 -> decode TP 1, real NIXL, one process
per rank): the blocks the decode holds itself are not read, only the rest, gathered head by head; the
bytes counted are those moved; both prefill ranks free the request."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.kv_transfer.params import PrefillAnswer, RemoteDecodeRequest
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.pd_procs import ConnectorProcess

pytestmark = pytest.mark.e2e

BLOCK_SIZE = 4
SPEC = dict(block_size=BLOCK_SIZE, groups=2, num_blocks=24)
PROMPT = list(range(100, 117))  # 17 tokens: positions 0..15 load, 4 blocks per group
P_IDS = [[3, 4, 9, 10, 11], [0, 1, 2, 7, 8]]
D_FULL = [[5, 6, 7, 1, 2], [10, 3, 4, 5, 6]]
D_HIT = [[12, 13, 14, 15, 16], [17, 18, 19, 20, 21]]  # blocks 0 and 1 are the decode's own prefix hit
LOCAL = 2 * BLOCK_SIZE


def _config() -> DeploymentConfig:
    kv = KVTransferConfig(transfer_mode="pull", verify_kv=True, handshake_timeout_seconds=3.0,
                          transfer_timeout_seconds=30.0, engine_id="unused")
    return secured(DeploymentConfig(device="cpu", kv_transfer=kv))


@pytest.fixture
def ranks() -> Iterator[tuple[list[ConnectorProcess], ConnectorProcess]]:
    procs: list[ConnectorProcess] = []
    try:
        for rank in range(2):
            procs.append(ConnectorProcess(_config(), InstanceSpec(role="prefill", port=1, engine_id="engine-P",
                                                                  device="cpu"),
                                          seed=10 * rank, num_kv_heads=1, tp_size=2, tp_rank=rank, **SPEC))
        procs.append(ConnectorProcess(_config(), InstanceSpec(role="decode", port=2, engine_id="engine-D",
                                                              device="cpu"), seed=5, num_kv_heads=2, **SPEC))
        yield procs[:2], procs[2]
    finally:
        for p in procs:
            p.close()


def _params(prefill: list[ConnectorProcess], rid: str) -> PrefillAnswer:
    """Every prefill rank holds the request; the params as TPConnector merges them (ports, checksums)."""
    answers = [p.call("request_finished", rid, PROMPT, RemoteDecodeRequest(do_remote_decode=True), P_IDS)
               for p in prefill]
    first: PrefillAnswer = answers[0][1]
    return first.model_copy(update={
        "remote_ports": [int(p.info["side_channel"].rsplit(":", 1)[1]) for p in prefill],
        "rank_kv_checksums": [a[1].kv_checksum for a in answers], "kv_checksum": None})


def _load(prefill: list[ConnectorProcess], decode: ConnectorProcess, rid: str, ids: list[list[int]],
          local: int) -> float:
    """Load `rid` into `ids` with `local` tokens already held by the decode; the bytes it moved."""
    before = decode.call("metric", "KV_TRANSFER_BYTES")
    params = _params(prefill, rid)
    external = decode.call("get_num_new_matched_tokens", rid, PROMPT, params, local)
    assert external == len(PROMPT) - 1 - local
    decode.call("start_load", rid, PROMPT, params, ids, local, external)
    ev = decode.wait_events(lambda e: rid in e.finished_recving or rid in e.failed_recving, what=f"load of {rid}")
    assert rid in ev.finished_recving, ev.failed_recving
    for p in prefill:
        p.wait_events(lambda e: rid in e.finished_sending, what=f"prefill rank freeing {rid}")
    return float(decode.call("metric", "KV_TRANSFER_BYTES") - before)


def test_resharding_load_skips_the_decodes_own_blocks(
        ranks: tuple[list[ConnectorProcess], ConnectorProcess]) -> None:
    prefill, decode = ranks
    full = _load(prefill, decode, "full", D_FULL, 0)
    untouched = [decode.call("blocks", g, D_HIT[g][:2]) for g in range(2)]
    hit = _load(prefill, decode, "hit", D_HIT, LOCAL)
    assert full > 0 and hit == full / 2  # 2 of the 4 blocks, from each prefill rank
    for g in range(2):
        got = decode.call("blocks", g, D_HIT[g][:4])
        assert torch.equal(got[:2], untouched[g]), f"group {g}: the local prefix was overwritten"
        for rank in range(2):
            source = prefill[rank].call("blocks", g, P_IDS[g][2:4])
            assert torch.equal(got[2:, :, :, :, rank:rank + 1], source), (g, rank)
