"""An LLMEngine (role prefill or decode, real connector from the factory) in its own process."""

from __future__ import annotations

import time
from typing import Any

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.engine.llm import build_config
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.rpc import Built, ProcessRPC

STEP_TIMEOUT = 120.0


def pd_config(model: str, connector: str, mode: str, storage_path: str = "", device: str = "cpu",
              **overrides: Any) -> DeploymentConfig:
    overrides.setdefault("block_size", 8)
    overrides.setdefault("num_gpu_blocks", 96)
    config = secured(build_config(model, device, "float32", overrides))
    config.colocated = False
    config.kv_transfer.connector = connector
    config.kv_transfer.transfer_mode = mode
    config.kv_transfer.verify_kv = True
    if storage_path:
        config.kv_transfer.storage_path = storage_path
    return config


def build_engine(config_json: str, instance_json: str) -> Built:
    from pdlaunch.engine.llm_engine import LLMEngine
    from pdlaunch.engine.outputs import SamplingParams
    from pdlaunch.metrics.kv_transfer import KV_EXPIRED_REQUESTS, KV_TRANSFER_BYTES

    engine = LLMEngine(DeploymentConfig.model_validate_json(config_json),
                       InstanceSpec.model_validate_json(instance_json))

    def generate(requests: list[tuple[str, list[int], dict[str, Any], dict[str, Any] | None]]) -> dict[str, dict]:
        """Run (request_id, prompt, sampling, kv_transfer_params) to completion; final outputs by id."""
        for rid, prompt, sampling, kv_params in requests:
            engine.add_request(rid, prompt, SamplingParams(**sampling), kv_params)
        final: dict[str, dict] = {}
        deadline = time.monotonic() + STEP_TIMEOUT
        while engine.has_unfinished_requests():
            if time.monotonic() > deadline:
                raise TimeoutError(f"requests unfinished after {STEP_TIMEOUT}s: {engine.stats()}")
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = {
                        "tokens": out.output_token_ids, "finish_reason": out.finish_reason, "error": out.error,
                        "kv_transfer_params": out.kv_transfer_params, "num_cached_tokens": out.num_cached_tokens,
                    }
            engine.check_integrity()
        return final

    def drain(timeout: float = 60.0) -> int:
        """Step until no finished request holds blocks for a peer; returns the blocks still used."""
        deadline = time.monotonic() + timeout
        while engine.scheduler.held:
            if time.monotonic() > deadline:
                raise TimeoutError(f"held requests not freed within {timeout}s: {sorted(engine.scheduler.held)}")
            engine.step()
            time.sleep(0.005)
        engine.check_integrity()
        return engine.block_manager.num_used_blocks()

    def check() -> dict[str, Any]:
        engine.check_integrity()
        spec = engine.kv_cache_spec()
        return {"stats": dict(engine.stats()), "used_blocks": engine.block_manager.num_used_blocks(),
                "block_bytes": spec.block_bytes, "block_size": spec.block_size,
                "windows": spec.group_sliding_window,
                "bytes_moved": float(KV_TRANSFER_BYTES._value.get()),
                "expired": float(KV_EXPIRED_REQUESTS._value.get())}

    def info() -> dict[str, Any]:
        return engine.connector.info() if engine.connector is not None else {}

    return ({"generate": generate, "drain": drain, "check": check, "info": info, "forget_engine": engine.forget_engine},
            engine.shutdown, info())


class EngineProcess(ProcessRPC):
    def __init__(self, config: DeploymentConfig, instance: InstanceSpec) -> None:
        super().__init__(build_engine, config.model_dump_json(), instance.model_dump_json())
