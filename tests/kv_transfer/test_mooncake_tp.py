"""PD with TP inside instances over Mooncake: real TP engines (one process per rank), each rank moving
its own KV-head slice through its own TransferEngine. P2/D2 pushes (rank r writes into decode rank r);
P1/D2 and P2/D1 reshard (pull). Greedy outputs equal a colocated TP-1 engine's; no block stays held."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.config.deployment_config import InstanceSpec
from tests.kv_transfer.engine_procs import pd_config
from tests.kv_transfer.mooncake_skip import requires_mooncake
from tests.kv_transfer.test_pd_engines import PROMPTS, colocated
from tests.tp.pd_procs import TPEngineProcess
from tests.tp.test_tp_pd import run_pd

pytestmark = [pytest.mark.e2e, pytest.mark.slow, requires_mooncake]


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 2), (1, 2), (2, 1)])
def test_mooncake_tp_pd_equals_colocated(llama_ckpt: Path, prefill_tp: int, decode_tp: int) -> None:
    expected = colocated(llama_ckpt, PROMPTS)
    config = pd_config(str(llama_ckpt), "mooncake", "auto")
    prefill = TPEngineProcess(config, InstanceSpec(role="prefill", port=1, tp=prefill_tp,
                                                   engine_id=f"P-mc-tp{prefill_tp}"))
    try:
        decode = TPEngineProcess(config, InstanceSpec(role="decode", port=2, tp=decode_tp,
                                                      engine_id=f"D-mc-tp{decode_tp}"))
        try:
            outs = run_pd(prefill, decode, PROMPTS)
            assert {rid: o["tokens"] for rid, o in outs.items()} == expected
            info = decode.call("info")
            assert info["connector"] == "mooncake" and info["transport"] == "tcp", info
            if prefill_tp == decode_tp:
                assert info["transfer_mode"] == "push", info
            for side in (prefill, decode):
                state = side.call("check")
                assert state["used_blocks"] == 0 and state["stats"]["num_held"] == 0
        finally:
            decode.close()
    finally:
        prefill.close()
