"""KV offload across sleep. Level 1 keeps the weights in host memory and restores them identical: the CPU tier
keeps its blocks and a prompt evicted before the sleep is served from it after the wake-up. Level 2 discards
the weights and the wake-up reloads them from the checkpoint's files, which may hold new weights by then (an RL
weight update): the tier's KV was computed by the old ones, so the reload empties it, and a prompt evicted
before the sleep is computed again. The device prefix cache is forgotten at every sleep."""

from __future__ import annotations

import shutil
from pathlib import Path

from pdlaunch.engine.llm_engine import LLMEngine
from tests.engine.conftest import MakeEngine, run_all
from tests.helpers.checkpoints import hf_greedy, make_qwen2_hybrid
from tests.offload.test_engine_offload import GREEDY, OPTIONS, _prompts


def _offload_prompt(engine: LLMEngine, checkpoint: Path) -> list[int]:
    """A prompt served (and checked against transformers), then pushed out of the device cache into the tier."""
    assert engine.offload is not None
    prompt = _prompts([30], seed=51)[0]
    assert run_all(engine, [prompt], GREEDY)[0].output_token_ids == hf_greedy(checkpoint, prompt, GREEDY.max_tokens)
    for flush in _prompts([30, 29, 31], seed=52):
        run_all(engine, [flush], GREEDY)  # the prompt's blocks leave the device cache for the CPU tier
    assert engine.offload.tier.num_used_blocks() > 0
    return prompt


def test_cpu_tier_serves_after_level1_sleep_and_wake(hybrid_ckpt: Path, make_engine: MakeEngine) -> None:
    engine = make_engine(hybrid_ckpt, enable_sleep_mode=True, **OPTIONS)
    assert engine.offload is not None
    prompt = _offload_prompt(engine, hybrid_ckpt)
    stored = engine.offload.tier.num_used_blocks()

    engine.sleep(1)
    assert engine.offload.idle and engine.offload.tier.num_used_blocks() == stored
    engine.wake_up(["weights"])
    engine.wake_up(["kv_cache"])
    assert not engine.is_sleeping() and engine.runner.weights_version == 0
    assert engine.offload.tier.num_used_blocks() == stored
    engine.check_integrity()

    before = engine.stats()
    again = run_all(engine, [prompt], GREEDY)[0]
    assert again.output_token_ids == hf_greedy(hybrid_ckpt, prompt, GREEDY.max_tokens)
    cpu_blocks = (len(prompt) - 1) // 4
    assert engine.stats()["offload_loaded_blocks"] - before["offload_loaded_blocks"] == cpu_blocks
    assert again.num_cached_tokens == 4 * cpu_blocks


def test_level2_reload_empties_the_cpu_tier(hybrid_ckpt: Path, make_engine: MakeEngine) -> None:
    """The same weights come back here, but the engine cannot know that: every tier block is free again, the
    tier fills again from what runs after the wake-up."""
    engine = make_engine(hybrid_ckpt, enable_sleep_mode=True, **OPTIONS)
    assert engine.offload is not None
    prompt = _offload_prompt(engine, hybrid_ckpt)

    engine.sleep(2)
    assert engine.offload.idle and engine.offload.tier.num_used_blocks() > 0  # the sleep alone keeps it
    engine.wake_up(["kv_cache"])
    assert engine.offload.tier.num_used_blocks() > 0  # the weights are not reloaded yet
    engine.wake_up(["weights"])
    assert not engine.is_sleeping() and engine.runner.weights_version == 1
    tier = engine.offload.tier
    assert tier.num_used_blocks() == 0 and sorted(tier.free) == list(range(tier.num_blocks))
    engine.check_integrity()

    before = engine.stats()
    again = run_all(engine, [prompt], GREEDY)[0]
    assert again.output_token_ids == hf_greedy(hybrid_ckpt, prompt, GREEDY.max_tokens)
    assert engine.stats()["offload_loaded_blocks"] == before["offload_loaded_blocks"]
    assert again.num_cached_tokens == 0
    for flush in _prompts([30, 29, 31], seed=52):
        run_all(engine, [flush], GREEDY)
    assert tier.num_used_blocks() > 0  # offloading goes on
    again = run_all(engine, [prompt], GREEDY)[0]
    assert again.output_token_ids == hf_greedy(hybrid_ckpt, prompt, GREEDY.max_tokens)
    assert engine.stats()["offload_loaded_blocks"] > before["offload_loaded_blocks"]


def test_level2_reload_of_new_weights_does_not_serve_old_kv_from_cpu_tier(tmp_path: Path,
                                                                          make_engine: MakeEngine) -> None:
    ckpt = make_qwen2_hybrid(tmp_path / "model", seed=3)
    engine = make_engine(ckpt, enable_sleep_mode=True, **OPTIONS)
    assert engine.offload is not None
    prompt = _offload_prompt(engine, ckpt)

    engine.sleep(2)
    # New weights land in the checkpoint directory while the instance sleeps (an RL weight update).
    new = make_qwen2_hybrid(tmp_path / "new", seed=33)
    for f in new.iterdir():
        shutil.copy(f, ckpt / f.name)
    engine.wake_up()
    assert engine.runner.weights_version == 1

    before = engine.stats()["offload_loaded_blocks"]
    out = run_all(engine, [prompt], GREEDY)[0]
    loaded = engine.stats()["offload_loaded_blocks"] - before
    assert loaded == 0, f"{loaded} KV blocks computed by the old weights were loaded from the CPU tier"
    assert out.output_token_ids == hf_greedy(ckpt, prompt, GREEDY.max_tokens)
