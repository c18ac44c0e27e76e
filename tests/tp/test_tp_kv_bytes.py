"""A TP decode's KV transfer series count every rank's share: ranks 1..T-1 are worker processes whose own series
nobody serves, so rank 0 observes what each rank moved (distributed/tp_connector.py). It used to count only its own
share: `pdlaunch_kv_transfer_bytes_total` read half of what a TP-2 decode loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kv_transfer.test_pd_engines import PROMPTS
from tests.tp.pd_procs import tp_pd_pair
from tests.tp.test_tp_pd import run_pd


@pytest.mark.e2e
@pytest.mark.slow
def test_a_tp2_decode_counts_the_bytes_a_tp1_decode_counts(llama_ckpt: Path) -> None:
    prompts = {"many-blocks": PROMPTS["many-blocks"]}
    moved: dict[int, float] = {}
    for tp in (1, 2):  # the same prefill TP as the decode's: each decode rank reads its heads' share, no more
        for prefill, decode in tp_pd_pair(llama_ckpt, tp, tp):
            before = decode.call("check")["bytes_moved"]
            run_pd(prefill, decode, prompts)
            moved[tp] = decode.call("check")["bytes_moved"] - before
    assert moved[1] > 0
    assert moved[2] == moved[1]
