"""MoE models through the engine features dense models have (issue 26 item 5), on CPU in one process:
prefix-cache hits, the CPU offload tier, sleep levels 1 and 2 (the weights pool holds the stacked experts)
and structured output each leave the greedy tokens equal to transformers' (and to the run without them)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.structured_output import StructuredOutput
from pdlaunch.model.moe.experts import FusedExperts
from tests.engine.conftest import MakeEngine, run_all
from tests.helpers.checkpoints import hf_greedy

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [random.Random(3).randrange(0, 500) for _ in range(30)]


@pytest.fixture(scope="module")
def expected(moe_ckpt: Callable[[str], Path]) -> list[int]:
    return hf_greedy(moe_ckpt("qwen3_moe"), PROMPT, GREEDY.max_tokens)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prefix_cache_hits_keep_moe_outputs(prefix_caching: bool, moe_ckpt: Callable[[str], Path],
                                            expected: list[int], make_engine: MakeEngine) -> None:
    engine = make_engine(moe_ckpt("qwen3_moe"), enable_prefix_caching=prefix_caching)
    first, again = (run_all(engine, [PROMPT], GREEDY)[0] for _ in range(2))
    assert first.output_token_ids == again.output_token_ids == expected
    assert again.num_cached_tokens == (24 if prefix_caching else 0)  # 3 full blocks of 8 tokens


def test_cpu_offload_tier_serves_moe_prefix(moe_ckpt: Callable[[str], Path], expected: list[int],
                                            make_engine: MakeEngine) -> None:
    engine = make_engine(moe_ckpt("qwen3_moe"), block_size=4, num_gpu_blocks=12, kv_offload_gb=0.001,
                         max_num_batched_tokens=16)
    assert run_all(engine, [PROMPT], GREEDY)[0].output_token_ids == expected
    rng = random.Random(4)
    for _ in range(3):  # other prompts take every device block: the first prompt's blocks go to the CPU tier
        run_all(engine, [[rng.randrange(0, 500) for _ in range(30)]], GREEDY)
    assert engine.block_manager.match_prefix(PROMPT, len(PROMPT) - 1).num_tokens == 0
    before = engine.stats()
    assert run_all(engine, [PROMPT], GREEDY)[0].output_token_ids == expected
    assert engine.stats()["offload_loaded_blocks"] - before["offload_loaded_blocks"] == (len(PROMPT) - 1) // 4


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_and_restores_the_experts(level: int, moe_ckpt: Callable[[str], Path], expected: list[int],
                                              make_engine: MakeEngine) -> None:
    engine = make_engine(moe_ckpt("qwen3_moe"), enable_sleep_mode=True)
    experts = [m for m in engine.runner.model.modules() if isinstance(m, FusedExperts)]
    assert len(experts) == 2  # layers 0 and 2; layer 1 is a dense mlp_only layer
    assert run_all(engine, [PROMPT], GREEDY)[0].output_token_ids == expected
    engine.sleep(level)
    assert all(e.w13.untyped_storage().nbytes() == 0 == e.w2.untyped_storage().nbytes() for e in experts)
    engine.wake_up()
    assert not engine.is_sleeping()
    assert run_all(engine, [PROMPT], GREEDY)[0].output_token_ids == expected


def test_structured_output_on_moe(moe_ckpt: Callable[[str], Path], expected: list[int],
                                  make_engine: MakeEngine) -> None:
    engine = make_engine(moe_ckpt("qwen3_moe"))

    def constrained(kind: str, value: str) -> SamplingParams:
        return SamplingParams(structured_output=StructuredOutput(kind=kind, value=value),  # type: ignore[arg-type]
                              max_tokens=40, temperature=0.0)

    regex, choice, plain = run_all(engine, [PROMPT] * 3, [
        constrained("regex", r"[a-c]{2,4}-\d\d"), constrained("choice", '["red", "green", "blue"]'), GREEDY])
    assert re.fullmatch(r"[a-c]{2,4}-\d\d", regex.text), regex.text
    assert choice.text in ("red", "green", "blue"), choice.text
    assert plain.output_token_ids == expected  # grammar masks of the batch's other rows leave it alone
