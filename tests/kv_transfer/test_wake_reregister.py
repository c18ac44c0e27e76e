"""After a sleep/wake cycle the KV memory is registered with NIXL again, and decode shakes hands anew.

On CPU the sleep backend frees the KV tensors' storages and allocates new ones, so the addresses
really change: a decode that kept the old handshake would read freed memory (verify_kv is on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdlaunch.config.models import InstanceSpec
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

    return {**methods, "sleep_wake": sleep_wake}, shutdown, info


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
