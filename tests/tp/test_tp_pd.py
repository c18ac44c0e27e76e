"""PD with TP inside instances: each rank moves its own KV-head slice over its own NIXL agent.

Greedy outputs of decode == a colocated TP-1 engine's; both sides hold no block afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdlaunch.config.deployment_config import InstanceSpec
from tests.kv_transfer.engine_procs import pd_config
from tests.kv_transfer.test_pd_engines import GREEDY, PROMPTS, colocated
from tests.tp.pd_procs import TPEngineProcess, tp_pd_pair


def run_pd(prefill, decode, prompts: dict[str, list[int]]) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    first = prefill.call("generate", [(rid, p, {**GREEDY, "max_tokens": 1}, {"do_remote_decode": True})
                                      for rid, p in prompts.items()])
    for out in first.values():
        params = out["kv_transfer_params"]
        ports = params.get("remote_ports", [params["remote_port"]])  # a TP-1 prefill has one side channel
        assert params["do_remote_prefill"] and len(ports) == params["tp_size"], out
    outs = decode.call("generate", [(rid, p, GREEDY, first[rid]["kv_transfer_params"]) for rid, p in prompts.items()])
    for rid, out in outs.items():
        assert out["error"] is None, f"{rid}: {out['error']}"
        assert out["num_cached_tokens"] <= len(prompts[rid]) - 1  # prefix-cache hits only (issue 33)
    assert prefill.call("drain") == 0  # every rank's hold was released (by every decode rank that read it)
    return outs


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 2), (1, 2), (2, 1)])
def test_tp_pd_equals_colocated(llama_ckpt: Path, prefill_tp: int, decode_tp: int) -> None:
    # llama_ckpt has 2 KV heads: P1/D2 splits prefill's block between two decode ranks, P2/D1
    # gathers one decode block from two prefill ranks (resharding, kv_transfer/reshard.py).
    expected = colocated(llama_ckpt, PROMPTS)
    for prefill, decode in tp_pd_pair(llama_ckpt, prefill_tp, decode_tp):
        outs = run_pd(prefill, decode, PROMPTS)
        assert {rid: o["tokens"] for rid, o in outs.items()} == expected
        for side in (prefill, decode):
            state = side.call("check")
            assert state["used_blocks"] == 0 and state["stats"]["num_held"] == 0


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 2), (2, 1)])
def test_tp_pd_replicated_kv_head_equals_colocated(one_kv_head_ckpt: Path, prefill_tp: int, decode_tp: int) -> None:
    # One KV head: the TP-2 side holds it on both ranks. P1/D2: both decode ranks read prefill
    # rank 0 (it frees after both read_done); P2/D1: decode reads rank 0 and only tells rank 1 to free.
    prompts = {rid: PROMPTS[rid] for rid in ("block-plus-one", "many-blocks")}
    expected = colocated(one_kv_head_ckpt, prompts)
    for prefill, decode in tp_pd_pair(one_kv_head_ckpt, prefill_tp, decode_tp):
        outs = run_pd(prefill, decode, prompts)
        assert {rid: o["tokens"] for rid, o in outs.items()} == expected
        assert decode.call("check")["used_blocks"] == 0


@pytest.mark.gpu
@pytest.mark.e2e
@pytest.mark.parametrize("cumem", [False, True], ids=["cudamalloc", "cumem-staging"])
@pytest.mark.parametrize("prefill_devices,decode_devices", [([0], [1, 2]), ([0, 1], [2])], ids=["p1d2", "p2d1"])
def test_tp_pd_resharding_on_gpus(llama_ckpt: Path, prefill_devices: list[int], decode_devices: list[int],
                                  cumem: bool) -> None:
    # Every prefill rank on its own GPU, apart from the decode ranks: resharding pulls, and pull needs
    # NVLink between two GPUs (auto picks it). cumem: both sides' KV in CuMem pools, so the prefill
    # side stages its blocks and decode reads those slots.
    if torch.cuda.device_count() < 3:
        pytest.skip(f"needs 3 CUDA devices joined by NVLink, found {torch.cuda.device_count()}")
    expected = colocated(llama_ckpt, PROMPTS, device="cuda")
    config = pd_config(str(llama_ckpt), "nixl", "auto", device="cuda", enable_cumem_allocator=cumem)
    prefill = TPEngineProcess(config, InstanceSpec(role="prefill", port=1, tp=len(prefill_devices), device="cuda",
                                                   devices=prefill_devices, engine_id="P-gpu"))
    try:
        decode = TPEngineProcess(config, InstanceSpec(role="decode", port=2, tp=len(decode_devices), device="cuda",
                                                      devices=decode_devices, engine_id="D-gpu"))
        try:
            outs = run_pd(prefill, decode, PROMPTS)
            assert {rid: o["tokens"] for rid, o in outs.items()} == expected
            info = decode.call("info")
            assert info["transfer_mode"] == "pull", info
            for side in (prefill, decode):
                assert side.call("check")["used_blocks"] == 0
        finally:
            decode.close()
    finally:
        prefill.close()


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 2), (1, 2), (2, 1)])
def test_tp_decode_request_its_first_token_ends_releases_every_prefill_rank(llama_ckpt: Path, prefill_tp: int,
                                                                            decode_tp: int) -> None:
    # The decode request ends at admission (max_tokens 1, the prefill's token): its load never starts, and every
    # decode rank tells the prefill rank(s) it would have read to drop the hold, long before the 600 s lease.
    prompt = PROMPTS["many-blocks"]
    for prefill, decode in tp_pd_pair(llama_ckpt, prefill_tp, decode_tp, lease_s=600.0):
        first = prefill.call("generate", [("r", prompt, {**GREEDY, "max_tokens": 1},
                                           {"do_remote_decode": True, "return_first_token": True})])
        params = first["r"]["kv_transfer_params"]
        assert params["first_token_ids"] and prefill.call("check")["stats"]["num_held"] == 1
        decode.call("generate", [("r", prompt, {**GREEDY, "max_tokens": 1}, params)])
        assert decode.call("check")["used_blocks"] == 0
        assert prefill.call("drain", 60.0) == 0  # raises while any rank still holds it
