"""After a sleep/wake cycle the KV memory is registered with NIXL again, and decode shakes hands anew.

On CPU the sleep backend frees the KV tensors' storages and allocates new ones, so the addresses
really change: a decode that kept the old handshake would read freed memory (verify_kv is on).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from pdlaunch.config.deployment_config import InstanceSpec
from pdlaunch.engine.sleep_mode import HOLD_DRAIN_S
from pdlaunch.errors import PdlaunchError
from tests.kv_transfer.engine_procs import build_engine, pd_config
from tests.kv_transfer.rpc import Built, ProcessRPC
from tests.kv_transfer.test_pd_engines import PROMPTS, colocated, run_pd

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def build_sleepy_engine(config_json: str, instance_json: str) -> Built:
    methods, shutdown, info = build_engine(config_json, instance_json)

    engine = shutdown.__self__  # type: ignore[attr-defined]  # the bound LLMEngine.shutdown

    def sleep_wake() -> dict[str, Any]:
        before = [t.data_ptr() for t in engine.runner.kv_caches]
        engine.sleep(1)
        engine.wake_up(None)
        after = [t.data_ptr() for t in engine.runner.kv_caches]
        return {"moved": before != after, "info": engine.connector.info()}

    def try_sleep() -> dict[str, Any]:
        """Sleep (and wake) if the engine lets it: the refusal's message otherwise, and how long it took."""
        t0 = time.monotonic()
        try:
            engine.sleep(1)
        except PdlaunchError as exc:
            return {"error": exc.message, "seconds": time.monotonic() - t0, "held": len(engine.scheduler.held)}
        engine.wake_up(None)
        return {"error": None, "seconds": time.monotonic() - t0, "held": len(engine.scheduler.held),
                "used_blocks": engine.block_manager.num_used_blocks()}

    return {**methods, "sleep_wake": sleep_wake, "try_sleep": try_sleep}, shutdown, info


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_pd_after_prefill_wake(llama_ckpt: Path, mode: str) -> None:
    expected = colocated(llama_ckpt, PROMPTS)
    config = pd_config(str(llama_ckpt), "nixl", mode)
    config.model.enable_sleep_mode = True
    prefill = ProcessRPC(build_sleepy_engine, config.model_dump_json(),
                         InstanceSpec(role="prefill", port=1, engine_id=f"P-wake-{mode}", device="cpu")
                         .model_dump_json())
    decode = ProcessRPC(build_engine, config.model_dump_json(),
                        InstanceSpec(role="decode", port=2, engine_id=f"D-wake-{mode}", device="cpu")
                        .model_dump_json())
    try:
        first = {rid: out["tokens"] for rid, out in run_pd(prefill, decode, PROMPTS).items()}
        assert first == expected
        woke = prefill.call("sleep_wake")
        assert woke["moved"], "the CPU sleep backend should have given the KV new storage"
        again = {rid: out["tokens"] for rid, out in
                 run_pd(prefill, decode, {f"{rid}-2": p for rid, p in PROMPTS.items()}).items()}
        assert again == {f"{rid}-2": toks for rid, toks in expected.items()}
        prefill.call("check")
        decode.call("check")
    finally:
        decode.close()
        prefill.close()


@pytest.mark.parametrize("lease", [60.0, 1.0])
def test_sleep_waits_for_a_finished_requests_hold(llama_ckpt: Path, lease: float) -> None:
    """A prefill whose only work left is the KV held for a finished request: /sleep steps the engine for
    up to HOLD_DRAIN_S while that hold can still go (here by its lease, as it goes when the decode
    reads it); a hold that outlives the window is refused, naming it."""
    config = pd_config(str(llama_ckpt), "nixl", "pull")
    config.model.enable_sleep_mode = True
    config.kv_transfer.kv_lease_seconds = lease
    prefill = ProcessRPC(build_sleepy_engine, config.model_dump_json(),
                         InstanceSpec(role="prefill", port=1, engine_id="P-hold", device="cpu").model_dump_json())
    try:
        first = prefill.call("generate", [("r", PROMPTS["many-blocks"], {"temperature": 0.0, "max_tokens": 1},
                                           {"do_remote_decode": True})])["r"]
        assert first["kv_transfer_params"]["do_remote_prefill"]
        result = prefill.call("try_sleep")
        if lease < HOLD_DRAIN_S:  # the lease ends inside the window: the hold goes and the engine sleeps
            assert result["error"] is None and result["held"] == 0 and result["used_blocks"] == 0, result
            assert result["seconds"] < HOLD_DRAIN_S, result
        else:
            assert result["error"] == ("0 request(s) running and 1 KV hold(s) waiting for a decode "
                                       f"instance (after {HOLD_DRAIN_S:g}s)"), result
            assert result["seconds"] >= HOLD_DRAIN_S and result["held"] == 1, result
    finally:
        prefill.close()
