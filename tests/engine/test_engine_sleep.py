"""Engine sleep mode on CPU (tensor backend): same tokens after waking, prefix cache forgotten."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch

from pdlaunch.engine import sleep_mode
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import EngineError, PdlaunchError
from pdlaunch.metrics.vllm_series import ENGINE_SLEEP_STATE, SLEEP_STATES, set_sleep_state, vllm
from tests.engine.conftest import MakeEngine, run_all

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [40, 41, 42]]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_and_wake_keep_outputs(level: int, llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(llama_ckpt, enable_sleep_mode=True)
    before = [o.output_token_ids for o in run_all(engine, PROMPTS, GREEDY)]
    result = engine.sleep(level)
    assert engine.is_sleeping() and result.freed_bytes > 0
    assert engine.runner.kv_caches[0].untyped_storage().nbytes() == 0
    with pytest.raises(EngineError, match="sleeping"):
        engine.add_request("x", PROMPTS[0], GREEDY)
    engine.wake_up(["weights"])
    assert engine.is_sleeping()  # the KV cache is still asleep
    engine.wake_up()
    assert not engine.is_sleeping()
    after = run_all(engine, PROMPTS, GREEDY)
    assert [o.output_token_ids for o in after] == before
    assert all(o.num_cached_tokens == 0 for o in after)  # the discarded KV is never reused


def test_sleep_refused_while_busy_or_disabled(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(llama_ckpt, enable_sleep_mode=True)
    engine.add_request("busy", PROMPTS[0], GREEDY)
    with pytest.raises(PdlaunchError, match="idle"):
        engine.sleep(1)
    assert not engine.is_sleeping()
    engine.abort_request("busy")
    plain = make_engine(llama_ckpt)
    with pytest.raises(EngineError, match="not enabled") as info:
        plain.sleep(1)
    assert info.value.field == "model.enable_sleep_mode" and not plain.is_sleeping()


def test_sleep_state_metric_follows_a_sleep_left_half_done(llama_ckpt, make_engine: MakeEngine,  # type: ignore[no-untyped-def]
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory's release failed after the weights went, and so did waking them back: the engine stays
    asleep at that level (a wake_up finishes it), and vllm:engine_sleep_state says so, not awake."""
    engine = make_engine(llama_ckpt, enable_sleep_mode=True)
    controller = engine._sleep.controller
    backend = controller._backend
    release, wake = backend.sleep, backend.wake_up

    def release_then_fail(offload_tags: list[str]) -> int:
        release(offload_tags)
        raise RuntimeError("injected failure after releasing the memory")

    def wake_fails(tags: list[str] | None = None) -> int:
        raise RuntimeError("injected failure waking the memory")

    set_sleep_state(None)  # as the instance starts
    monkeypatch.setattr(backend, "sleep", release_then_fail)
    monkeypatch.setattr(backend, "wake_up", wake_fails)
    with pytest.raises(RuntimeError, match="waking"):
        engine.sleep(1)
    assert engine.is_sleeping()
    state = {s: vllm(ENGINE_SLEEP_STATE, sleep_state=s)._value.get() for s in SLEEP_STATES}
    assert state == {"awake": 0, "weights_offloaded": 1, "discard_all": 0}

    monkeypatch.setattr(backend, "wake_up", wake)
    engine.wake_up()
    assert not engine.is_sleeping()
    assert vllm(ENGINE_SLEEP_STATE, sleep_state="awake")._value.get() == 1
    assert [o.output_token_ids for o in run_all(engine, PROMPTS, GREEDY)] == \
        [o.output_token_ids for o in run_all(make_engine(llama_ckpt), PROMPTS, GREEDY)]


def test_level2_wake_frees_the_reloaded_copy_at_once(llama_ckpt, make_engine: MakeEngine,  # type: ignore[no-untyped-def]
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The reload's second copy of the weights is freed before the wake-up returns, not at some later cyclic
    collection (each parameter's weight_loader holds its module): on a GPU that copy is a model's worth of device
    memory, which the KV cache woken next needs. The automatic collector is off here, as it may not run for long."""
    engine = make_engine(llama_ckpt, enable_sleep_mode=True)
    before = [o.output_token_ids for o in run_all(engine, PROMPTS, GREEDY)]
    copies: list[weakref.ref[torch.nn.Parameter]] = []
    load = sleep_mode.load_model

    def load_and_watch(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = load(*args, **kwargs)
        copies.extend(weakref.ref(p) for p in model.parameters())
        return model

    monkeypatch.setattr(sleep_mode, "load_model", load_and_watch)
    engine.sleep(2)
    gc.disable()
    try:
        engine.wake_up()
        alive = sum(ref() is not None for ref in copies)
    finally:
        gc.enable()
    assert copies and alive == 0, f"{alive} of the reload's {len(copies)} parameters outlived the wake-up"
    assert [o.output_token_ids for o in run_all(engine, PROMPTS, GREEDY)] == before
