"""CPU-tier failures through LLMEngine (block integrity checked after every step and test): a load that
cannot be queued fails only its own request, stores that cannot be queued lose only cache entries, and
the engine keeps serving with outputs equal to transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.errors import EngineError
from pdlaunch.offload.transfer import GPULoadStoreSpec, TransferSpec
from tests.engine.conftest import MakeEngine, run_all
from tests.offload.test_engine_offload import GREEDY, OPTIONS, _hf, _prompts


def test_failed_cpu_tier_jobs_fail_only_their_own_request(hybrid_ckpt: Path, make_engine: MakeEngine,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(hybrid_ckpt, **OPTIONS)
    assert engine.offload is not None
    prompt, other = _prompts([30, 27], seed=41)
    run_all(engine, [prompt], GREEDY)
    for flush in _prompts([30, 29, 31], seed=42):  # evicts the prompt's blocks to the CPU tier
        run_all(engine, [flush], GREEDY)
    assert engine.offload.tier.num_used_blocks() > 0
    submit = engine.offload.transfer.transfer_async

    def loads_rejected(job_id: int, spec: TransferSpec) -> bool:
        if isinstance(spec[0], GPULoadStoreSpec):
            return submit(job_id, spec)
        raise EngineError("group 0: a block id is out of range", field="offload.spec")

    monkeypatch.setattr(engine.offload.transfer, "transfer_async", loads_rejected)
    failed, served = run_all(engine, [prompt, other], GREEDY)
    assert failed.finish_reason == "error" and "CPU offload tier" in (failed.error or "")
    assert served.output_token_ids == _hf(hybrid_ckpt, other)

    refused: list[int] = []

    def shut_down(job_id: int, spec: TransferSpec) -> bool:  # stores cannot be queued either
        refused.append(job_id)
        return False

    monkeypatch.setattr(engine.offload.transfer, "transfer_async", shut_down)
    stored, used = engine.offload.stored_blocks, engine.offload.tier.num_used_blocks()
    out = run_all(engine, _prompts([30, 29, 31], seed=43), GREEDY)
    assert all(o.finish_reason == "length" for o in out)
    assert refused and engine.offload.stored_blocks == stored and engine.offload.tier.num_used_blocks() == used
    engine.offload.wait_idle(timeout=60.0)
    assert engine.offload.idle
    engine.check_integrity()

    monkeypatch.undo()
    again = run_all(engine, [prompt], GREEDY)[0]
    assert again.output_token_ids == _hf(hybrid_ckpt, prompt)
