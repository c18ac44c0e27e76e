"""CPU-tier failures through LLMEngine (block integrity checked after every step and test): a load that
cannot be queued or that fails while copying fails only its own request, stores that cannot be queued
lose only cache entries, and the engine keeps serving with outputs equal to transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.errors import EngineError
from pdlaunch.offload import metrics
from pdlaunch.offload.transfer_spec import GPULoadStoreSpec, TransferSpec
from tests.engine.conftest import MakeEngine, run_all
from tests.helpers.offload_tier import loads_fail_while_copying
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


def test_a_load_that_fails_in_the_transfer_thread_fails_only_its_own_request(
        hybrid_ckpt: Path, make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy from the CPU tier raising (queued fine, failed while copying) stopped the whole engine. Now its
    request ends with an error in the step that loaded it, the blocks it took go back, its tier entries are
    dropped and the device prefix cache does not take what the failed load left in its blocks; the request
    admitted beside it completes."""
    engine = make_engine(hybrid_ckpt, **OPTIONS)
    offload, bm = engine.offload, engine.block_manager
    assert offload is not None
    prompt, other = _prompts([30, 27], seed=51)
    run_all(engine, [prompt], GREEDY)
    for flush in _prompts([30, 29, 31], seed=52):  # evicts the prompt's blocks to the CPU tier
        run_all(engine, [flush], GREEDY)
    usable = len(prompt) - 1
    device_hit = bm.match_prefix(prompt, usable).num_tokens
    assert offload.match(prompt, bm.match_prefix(prompt, usable), usable) is not None
    free_at_start = bm.num_free_blocks()
    failed_metric = metrics.OFFLOAD_FAILED_JOBS.labels("load")._value.get()
    loads_fail_while_copying(offload, monkeypatch)
    engine.add_request("loads", prompt, GREEDY)
    engine.add_request("other", other, GREEDY)
    first_step = {out.request_id: out for out in engine.step()}  # both admitted: the load fails in this step
    failed = first_step["loads"]
    assert failed.finished and failed.finish_reason == "error" and failed.error_status == 500
    assert "CPU offload tier" in (failed.error or "") and "RuntimeError" in (failed.error or "")
    assert engine.scheduler.running == [engine.scheduler.requests["other"]]
    # Checked before the other request's allocations can evict (and store) what the failed load left.
    assert bm.match_prefix(prompt, usable).num_tokens == device_hit, "the failed load's blocks were cached"
    assert offload.match(prompt, bm.match_prefix(prompt, usable), usable) is None, "failed tier entries stayed"
    assert metrics.OFFLOAD_FAILED_JOBS.labels("load")._value.get() == failed_metric + 1
    engine.check_integrity()
    served = None
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            break
        served = next((out for out in engine.step() if out.request_id == "other" and out.finished), served)
        engine.check_integrity()
    assert served is not None and served.finish_reason == "length"
    assert served.output_token_ids == _hf(hybrid_ckpt, other)
    offload.wait_idle(timeout=60.0)
    assert offload.idle
    assert bm.num_used_blocks() == 0 and bm.num_free_blocks() == free_at_start

    monkeypatch.undo()
    again = run_all(engine, [prompt], GREEDY)[0]
    assert again.output_token_ids == _hf(hybrid_ckpt, prompt)
