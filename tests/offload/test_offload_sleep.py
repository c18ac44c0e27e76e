"""KV offload across sleep: the CPU tier keeps its blocks (the same weights come back), the device
prefix cache is forgotten, and a prompt evicted before the sleep is served from the tier after it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.conftest import MakeEngine, run_all
from tests.helpers.checkpoints import hf_greedy
from tests.offload.test_engine_offload import GREEDY, OPTIONS, _prompts


@pytest.mark.parametrize("level", [1, 2])
def test_cpu_tier_serves_after_sleep_and_wake(level: int, hybrid_ckpt: Path, make_engine: MakeEngine) -> None:
    engine = make_engine(hybrid_ckpt, enable_sleep_mode=True, **OPTIONS)
    assert engine.offload is not None
    prompt = _prompts([30], seed=51)[0]
    reference = hf_greedy(hybrid_ckpt, prompt, GREEDY.max_tokens)
    assert run_all(engine, [prompt], GREEDY)[0].output_token_ids == reference
    for flush in _prompts([30, 29, 31], seed=52):
        run_all(engine, [flush], GREEDY)
    stored = engine.offload.tier.num_used_blocks()
    assert stored > 0

    engine.sleep(level)
    assert engine.offload.idle and engine.offload.tier.num_used_blocks() == stored
    engine.wake_up(["weights"])
    engine.wake_up(["kv_cache"])
    assert not engine.is_sleeping()
    engine.check_integrity()

    before = engine.stats()
    again = run_all(engine, [prompt], GREEDY)[0]
    assert again.output_token_ids == reference
    cpu_blocks = (len(prompt) - 1) // 4
    assert engine.stats()["offload_loaded_blocks"] - before["offload_loaded_blocks"] == cpu_blocks
    assert again.num_cached_tokens == 4 * cpu_blocks
