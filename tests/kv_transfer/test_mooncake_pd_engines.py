"""PD over Mooncake end to end: a prefill and a decode LLMEngine in two processes, real TransferEngines
over TCP. Greedy outputs equal a colocated engine's for 1-token, one-block, block+1 and many-block
prompts, push (the default) and pull; a decode prefix-cache hit moves only the missing block; every
block comes back. After the prefill sleeps and wakes (the CPU sleep backend gives its KV new storage),
Mooncake has its KV registered again and the outputs are still right.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.config.deployment_config import InstanceSpec
from tests.kv_transfer.engine_procs import build_engine, pd_config
from tests.kv_transfer.mooncake_skip import requires_mooncake
from tests.kv_transfer.rpc import ProcessRPC
from tests.kv_transfer.test_pd_engines import PREFIX_HIT, PROMPTS, colocated, pd_pair, run_pd
from tests.kv_transfer.test_wake_reregister import build_sleepy_engine

pytestmark = [pytest.mark.e2e, pytest.mark.slow, requires_mooncake]


@pytest.mark.parametrize("mode", ["auto", "pull"])
def test_mooncake_pd_equals_colocated(llama_ckpt: Path, mode: str) -> None:
    expected = colocated(llama_ckpt, {**PROMPTS, "prefix-hit": PREFIX_HIT})
    for prefill, decode in pd_pair(llama_ckpt, "mooncake", mode):
        info = decode.info
        assert (info["connector"], info["transport"], info["transfer_mode"]) == (
            "mooncake", "tcp", "push" if mode == "auto" else "pull")
        outs = run_pd(prefill, decode, PROMPTS)
        assert {rid: o["tokens"] for rid, o in outs.items()} == {rid: expected[rid] for rid in PROMPTS}
        before = decode.call("check")
        hit = run_pd(prefill, decode, {"prefix-hit": PREFIX_HIT})
        assert hit["prefix-hit"]["tokens"] == expected["prefix-hit"]
        after = decode.call("check")
        assert after["bytes_moved"] - before["bytes_moved"] == sum(after["block_bytes"])  # only the 4th block
        for side in (prefill, decode):
            state = side.call("check")
            assert state["used_blocks"] == 0 and state["stats"]["num_held"] == 0
        assert prefill.call("check")["expired"] == 0


@pytest.mark.parametrize("mode", ["auto", "pull"])
def test_mooncake_pd_after_prefill_sleep_and_wake(llama_ckpt: Path, mode: str) -> None:
    # pull: the decode READs the prefill's new storage, which Mooncake's TCP server refuses unless it is
    # registered ("not within any registered buffer"): the outputs prove the re-registration.
    expected = colocated(llama_ckpt, PROMPTS)
    config = pd_config(str(llama_ckpt), "mooncake", mode)
    config.model.enable_sleep_mode = True
    p_spec = InstanceSpec(role="prefill", port=1, engine_id=f"P-mc-wake-{mode}", device="cpu")
    d_spec = InstanceSpec(role="decode", port=2, engine_id=f"D-mc-wake-{mode}", device="cpu")
    prefill = ProcessRPC(build_sleepy_engine, config.model_dump_json(), p_spec.model_dump_json())
    decode = ProcessRPC(build_engine, config.model_dump_json(), d_spec.model_dump_json())
    try:
        assert {rid: o["tokens"] for rid, o in run_pd(prefill, decode, PROMPTS).items()} == expected
        woke = prefill.call("sleep_wake")
        assert woke["moved"], "the CPU sleep backend should have given the KV new storage"
        again = run_pd(prefill, decode, {f"{rid}-2": p for rid, p in PROMPTS.items()})
        assert {rid: o["tokens"] for rid, o in again.items()} == {f"{rid}-2": t for rid, t in expected.items()}
        prefill.call("check")
        decode.call("check")
    finally:
        decode.close()
        prefill.close()
