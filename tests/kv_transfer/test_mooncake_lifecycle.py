"""KV lifecycle safety over real Mooncake: no write into freed blocks, no read of freed blocks.

Mooncake cannot cancel a transfer that runs, so these hold a transfer in flight (a delay inside the
transfer thread's Mooncake call, after the handle was returned):
- push, decode aborts or times out while the prefill's WRITE runs: the blocks are reported
  safe_to_free only after the WRITE ended (push_done, or push_failed after the sender waited for it),
  and nothing lands in them afterwards;
- pull, the decode's READ outlasts the prefill's lease: the claimed hold is not freed before it ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.kv_transfer.base import KVConnectorEvents
from pdlaunch.kv_transfer.params import RemoteDecodeRequest
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.mooncake_skip import requires_mooncake
from tests.kv_transfer.pd_procs import build_connector
from tests.kv_transfer.rpc import Built, ProcessRPC
from tests.kv_transfer.test_lifecycle_safety import D_IDS, P_IDS, PROMPT, SENTINEL, _until, _wait

pytestmark = [pytest.mark.e2e, pytest.mark.slow, requires_mooncake]

SLOW_SECONDS = 2.0


def build_slow_mooncake(config_json: str, instance_json: str, spec_kwargs: dict[str, Any], slow_op: str) -> Built:
    """build_connector plus: `slow_op` transfers ("READ"/"WRITE") sleep SLOW_SECONDS inside the transfer
    thread before moving bytes (the handle already says PROC), and fill(group, ids, value)."""
    from pdlaunch.kv_transfer.mooncake import engine as mooncake_engine

    started: list[str] = []
    original = mooncake_engine.MooncakeEngine.transfer

    def slow_transfer(self: Any, op: str, *args: Any) -> None:
        if op == slow_op:
            started.append(op)
            time.sleep(SLOW_SECONDS)
        original(self, op, *args)

    mooncake_engine.MooncakeEngine.transfer = slow_transfer  # type: ignore[method-assign]
    handlers, close, info = build_connector(config_json, instance_json, spec_kwargs)
    connector = close.__self__  # type: ignore[attr-defined]  # the bound MooncakeConnector.shutdown

    def fill(group: int, ids: list[int], value: float) -> None:
        connector.spec.kv_caches[group][torch.tensor(ids, dtype=torch.long)] = value

    return {**handlers, "fill": fill, "slow_started": lambda: len(started)}, close, info


class SlowMooncakeProcess(ProcessRPC):
    def __init__(self, config: DeploymentConfig, instance: InstanceSpec, slow_op: str, **spec: Any) -> None:
        super().__init__(build_slow_mooncake, config.model_dump_json(), instance.model_dump_json(), spec, slow_op)


def _pair(mode: str, slow: str, slow_op: str, transfer_timeout: float = 20.0, lease: float = 60.0
          ) -> Iterator[tuple[Any, Any]]:
    kv = KVTransferConfig(connector="mooncake", transfer_mode=mode, verify_kv=True, handshake_timeout_seconds=5.0,
                          transfer_timeout_seconds=transfer_timeout, kv_lease_seconds=lease, engine_id="unused")
    config = secured(DeploymentConfig(device="cpu", kv_transfer=kv))
    sides: list[Any] = []
    try:
        for role, seed in (("prefill", 1), ("decode", 2)):
            instance = InstanceSpec(role=role, port=seed, engine_id=f"mc-{role}", device="cpu")
            sides.append(SlowMooncakeProcess(config, instance, slow_op if role == slow else "", seed=seed,
                                             block_size=4, num_blocks=16))
        yield sides[0], sides[1]
    finally:
        for side in sides:
            side.close()


@pytest.mark.parametrize("how", ["abort", "timeout"])
def test_push_blocks_are_freed_only_after_the_write_ended(how: str) -> None:
    for prefill, decode in _pair("push", "prefill", "WRITE", transfer_timeout=1.0 if how == "timeout" else 20.0):
        source = prefill.call("blocks", 0, P_IDS[0])
        _, params = prefill.call("request_finished", "r", PROMPT, RemoteDecodeRequest(do_remote_decode=True), P_IDS)
        decode.call("start_load", "r", PROMPT, params, D_IDS, 0, len(PROMPT) - 1)
        merged = KVConnectorEvents()
        if how == "abort":
            _until(lambda: prefill.call("slow_started") == 1, "the prefill's WRITE to start")
            assert decode.call("abort_load", "r") is True  # a WRITE may still land: the engine keeps the blocks
        else:
            merged = _wait(decode, lambda e: "r" in e.failed_recving, what="the load to time out")
            assert "did not arrive within 1s" in merged.failed_recving["r"] and "r" in merged.draining
        if "r" not in merged.safe_to_free:
            merged = _wait(decode, lambda e: "r" in e.safe_to_free, what="safe_to_free")
        assert not merged.finished_recving
        decode.call("fill", 0, D_IDS[0], SENTINEL)  # freed: an engine would reuse the blocks now
        _wait(prefill, lambda e: "r" in e.finished_sending, what="the prefill freeing its hold")
        time.sleep(SLOW_SECONDS)  # room for a (buggy) late WRITE to land
        assert torch.all(decode.call("blocks", 0, D_IDS[0]) == SENTINEL), "bytes landed after safe_to_free"
        assert torch.equal(prefill.call("blocks", 0, P_IDS[0]), source)


def test_pull_read_keeps_prefill_blocks_past_the_lease() -> None:
    for prefill, decode in _pair("pull", "decode", "READ", lease=0.5):
        source = prefill.call("blocks", 0, P_IDS[0])
        _, params = prefill.call("request_finished", "r", PROMPT, RemoteDecodeRequest(do_remote_decode=True), P_IDS)
        decode.call("start_load", "r", PROMPT, params, D_IDS, 0, len(PROMPT) - 1)
        deadline = time.monotonic() + 30.0
        done = KVConnectorEvents()
        while "r" not in done.finished_recving and "r" not in done.failed_recving:
            assert time.monotonic() < deadline, "the load did not end within 30s"
            if "r" in prefill.call("get_finished").finished_sending:
                prefill.call("fill", 0, P_IDS[0], SENTINEL)  # freed blocks get reused at once
            ev = decode.call("get_finished")
            done.finished_recving |= ev.finished_recving
            done.failed_recving.update(ev.failed_recving)
            time.sleep(0.01)
        assert "r" in done.finished_recving, done.failed_recving.get("r")
        assert torch.equal(decode.call("blocks", 0, D_IDS[0]), source)  # read before any reuse
        assert prefill.call("metric", "KV_EXPIRED_REQUESTS") == 0  # freed by read_done, not the lease
