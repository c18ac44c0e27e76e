"""PD with TP inside instances for Qwen3 and the Llama 3.2 shape: decode's greedy ids == a colocated
TP-1 engine's while each rank moves its own KV-head slice (head_dim 32 != hidden/heads for Qwen3,
64 with a tied, vocabulary-split embedding for Llama 3.2). Colocated TP 2 parity is in test_tp_parity.
"""

from __future__ import annotations

import pytest

from tests.kv_transfer.test_pd_engines import PROMPTS, colocated
from tests.tp.pd_procs import tp_pd_pair
from tests.tp.test_tp_pd import run_pd


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("fixture,prefill_tp,decode_tp", [("qwen3_ckpt", 1, 2), ("llama32_ckpt", 2, 1)])
def test_tp_pd_equals_colocated(fixture: str, prefill_tp: int, decode_tp: int, request: pytest.FixtureRequest) -> None:
    # P1/D2 splits each prefill block between the decode ranks; P2/D1 gathers one block from two ranks.
    model = request.getfixturevalue(fixture)
    prompts = {rid: PROMPTS[rid] for rid in ("one-token", "block-plus-one", "many-blocks")}
    expected = colocated(model, prompts)
    for prefill, decode in tp_pd_pair(model, prefill_tp, decode_tp):
        outs = run_pd(prefill, decode, prompts)
        assert {rid: o["tokens"] for rid, o in outs.items()} == expected
        for side in (prefill, decode):
            state = side.call("check")
            assert state["used_blocks"] == 0 and state["stats"]["num_held"] == 0
