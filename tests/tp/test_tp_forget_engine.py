"""forget_engine on TP instances in real processes (CPU, NIXL, push, TP 2 on both sides): each rank of the prefill
loaded its own decode rank's agent, so forgetting the decode engine drops one agent per rank (rank 0 mirrors the
call to rank 1 over the rank stream), and the decode likewise forgets the prefill on both ranks; the next request
then loads them again and gives the same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kv_transfer.test_pd_engines import PROMPTS
from tests.tp.pd_procs import tp_pd_pair
from tests.tp.test_tp_pd import run_pd


@pytest.mark.e2e
@pytest.mark.slow
def test_every_rank_forgets_the_peer_engine(llama_ckpt: Path) -> None:
    prompts = {"many-blocks": PROMPTS["many-blocks"]}
    for prefill, decode in tp_pd_pair(llama_ckpt, 2, 2, mode="push"):
        first = run_pd(prefill, decode, prompts)
        assert prefill.call("info")["decode_engines"] == ["D-tp2"]  # rank 0's; rank 1 holds its own
        assert prefill.call("forget_engine", "D-tp2") == 2
        assert decode.call("forget_engine", "P-tp2") == 2
        assert prefill.call("forget_engine", "D-tp2") == 0 and prefill.call("info")["decode_engines"] == []
        again = run_pd(prefill, decode, prompts)
        assert {r: o["tokens"] for r, o in again.items()} == {r: o["tokens"] for r, o in first.items()}
        assert prefill.call("forget_engine", "D-tp2") == 2
