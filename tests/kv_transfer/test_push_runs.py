"""A push request names its blocks as runs (messages.PushRequest): few runs on the wire for a long prompt, the
same pairs on the prefill side, and runs out of range refused before any handler runs."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from pdlaunch.kv_transfer.blocks import coalesce
from pdlaunch.kv_transfer.messages import MAX_PUSH_BLOCKS, PushRequest


def _push(runs: list[list[Any]]) -> dict[str, Any]:
    return {"type": "push", "request_id": "r", "nonce": "n" * 32, "owner": "o" * 16, "reader": "d", "agent_name": "a",
            "agent_metadata": "ab", "runs": runs, "base_addrs": [0] * len(runs), "block_bytes": [64] * len(runs),
            "deadline_in": 5.0}


def test_an_8k_prompt_of_contiguous_blocks_is_one_run_and_expands_to_its_pairs() -> None:
    pairs = [(100 + i, 7 + i) for i in range(512)]  # decode ids, prefill ids
    runs = [[(r.local_start, r.remote_start, r.count) for r in coalesce(pairs)]]
    message = PushRequest.model_validate_json(PushRequest.model_validate(_push(runs)).model_dump_json())
    assert message.runs == [[(100, 7, 512)]]
    assert message.pairs() == [pairs]
    assert message.prefill_blocks() == [[7 + i for i in range(512)]]
    assert len(message.model_dump_json()) < 400  # the pairs, one by one, were ~5 KiB


def test_scattered_blocks_keep_their_order_and_groups() -> None:
    groups = [[(5, 9), (6, 10), (2, 11), (3, 30)], [], [(0, 1)]]
    runs = [[(r.local_start, r.remote_start, r.count) for r in coalesce(g)] for g in groups]
    message = PushRequest.model_validate(_push(runs))
    assert message.runs[0] == [(5, 9, 2), (2, 11, 1), (3, 30, 1)]
    assert message.pairs() == groups
    assert message.prefill_blocks() == [[9, 10, 11, 30], [], [1]]


@pytest.mark.parametrize("runs, why", [
    ([[(0, 0, 0)]], "greater than or equal to 1"),
    ([[(-1, 0, 1)]], "greater than or equal to 0"),
    ([[(0, 0, MAX_PUSH_BLOCKS + 1)]], "less than or equal to"),
    ([[(0, 0, MAX_PUSH_BLOCKS), (0, 0, 1)]], f"more than {MAX_PUSH_BLOCKS} blocks"),
    ([[(2**31 - 4, 0, 8)]], "2**31 or more"),
    ([[(0, 0)]], "runs"),
])
def test_runs_out_of_range_are_refused(runs: list[list[Any]], why: str) -> None:
    with pytest.raises(ValidationError) as caught:
        PushRequest.model_validate(_push(runs))
    assert why in str(caught.value)
