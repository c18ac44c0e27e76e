"""A finished request's last full block enters the prefix cache although, with async scheduling, the step
that computed it ran before its last token was known: a conversation's next turn finds every block."""

from __future__ import annotations

import pytest

from pdlaunch.engine.llm import LLM
from pdlaunch.engine.outputs import SamplingParams

BS = 8


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_next_turn_hits_every_computed_block(async_scheduling: bool) -> None:
    with LLM("tiny", device="cpu", block_size=BS, num_gpu_blocks=64, async_scheduling=async_scheduling) as llm:
        assert llm.engine.async_scheduling == async_scheduling
        prompt = list(range(10, 55))  # 45 tokens
        out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
        conversation = prompt + out.token_ids + [7, 8, 9]
        # positions 0..55 hold KV (the last answer token's is never computed): 7 full blocks
        assert llm.engine.block_manager.match_prefix(conversation, len(conversation) - 1).num_tokens == 7 * BS
        llm.engine.check_integrity()
