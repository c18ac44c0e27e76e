"""Engine sleep mode on CPU (tensor backend): same tokens after waking, prefix cache forgotten."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.engine import sleep_mode
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import EngineError, PdlaunchError
from pdlaunch.kv_transfer.factory import create_connector
from pdlaunch.kv_transfer.storage_connector import StorageConnector
from pdlaunch.metrics.vllm_series import ENGINE_SLEEP_STATE, SLEEP_STATES, set_sleep_state, vllm
from tests.engine.conftest import MakeEngine, run_all
from tests.helpers.checkpoints import make_llama
from tests.kv_transfer.deployment_secret import secured

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
    with pytest.raises(PdlaunchError, match="idle") as busy:
        engine.sleep(1)
    # refused at once: nothing waited (the drain window is only for holds when no request runs)
    assert busy.value.message == "1 request(s) running and 0 KV hold(s) waiting for a decode instance"
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



@pytest.mark.parametrize(("level", "wakes"), [(1, [None]), (2, [None]), (2, [["kv_cache"], ["weights"]]),
                                             (2, [["weights"], ["kv_cache"]])])
def test_stored_kv_is_keyed_by_the_weights_the_model_holds_after_a_wake(level: int, wakes: list[list[str] | None],
                                                                        tmp_path: Path,
                                                                        make_engine: MakeEngine) -> None:
    """The storage connector keys its files by a digest of the weights (model/weights_digest.py). A level-2 wake
    reloads them from the checkpoint directory, which may hold new ones by then (an RL trainer writes them there
    while the instance sleeps): the key must become the new weights', or the prefill stores KV of the new weights
    where KV of the old ones lies, and decodes of either load the other's. A level-1 wake keeps the weights it
    backed up, and so their key, whatever the files hold now. Woken a part at a time, the KV cache first, the key
    follows the weights woken (reloaded) after it."""
    checkpoint = make_llama(tmp_path / "ckpt", seed=0)
    config = secured(DeploymentConfig(device="cpu", kv_transfer=KVTransferConfig(
        connector="storage", storage_path=str(tmp_path / "kv"))))
    connector = create_connector(config, InstanceSpec(role="prefill", port=1, engine_id="prefill-0"))
    assert isinstance(connector, StorageConnector)
    engine = make_engine(checkpoint, connector=connector, enable_sleep_mode=True)
    first = connector.root
    engine.sleep(level)
    make_llama(checkpoint, seed=1)  # new weights written over the old ones in place
    for tags in wakes:
        engine.wake_up(tags)
    # an instance started on the files as they are now keys its store by their digest
    fresh = StorageConnector(config, InstanceSpec(role="prefill", port=2, engine_id="prefill-1"))
    fresh.register_kv_caches(make_engine(checkpoint).kv_cache_spec())
    assert first is not None and fresh.root != first
    assert connector.root == (fresh.root if level == 2 else first)
