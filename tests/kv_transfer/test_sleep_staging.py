"""Sleep releases the NIXL staging buffer too, and PD works after either side woke up.

On CUDA with sleep mode the KV cache lives in CuMem pools and KV moves through a staging buffer
(staging.py); here the buffer is forced on CPU with a few slots, so loads move in chunks. The CPU
sleep backend gives the KV cache new storage, so a decode that woke up has new NIXL registrations
that the prefill side must load before it pushes (verify_kv is on: stale ones fail the request).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.kv_transfer.params import RemoteDecodeRequest
from pdlaunch.kv_transfer.side_channel import client
from tests.kv_transfer.deployment_secret import KEYS, secured
from tests.kv_transfer.engine_procs import build_engine, pd_config
from tests.kv_transfer.pd_procs import build_connector
from tests.kv_transfer.rpc import Built, ProcessRPC
from tests.kv_transfer.test_pd_engines import PROMPTS, colocated, run_pd

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STAGING_SLOTS = 2  # fewer than the 7 blocks of PROMPTS["many-blocks"]: its loads move in chunks


def build_sleepy_engine(config_json: str, instance_json: str, staging_slots: int) -> Built:
    """An engine process whose connector stages KV through `staging_slots` slots (0: none), with sleep_wake."""
    from pdlaunch.kv_transfer.nixl_connector import NixlConnector

    if staging_slots:  # what a CuMem KV cache gets on CUDA (DEFAULT_STAGING_BYTES), forced on CPU
        NixlConnector._staging_budget = lambda self, spec: staging_slots * sum(spec.block_bytes)  # type: ignore
    methods, shutdown, info = build_engine(config_json, instance_json)
    engine = shutdown.__self__  # type: ignore[attr-defined]  # the bound LLMEngine.shutdown

    def sleep_wake() -> dict[str, Any]:
        before = [t.data_ptr() for t in engine.runner.kv_caches]
        epoch = engine.connector.kv_epoch
        engine.sleep(1)
        asleep = engine.connector.info()
        engine.wake_up(None)
        return {"moved": before != [t.data_ptr() for t in engine.runner.kv_caches], "asleep": asleep,
                "awake": engine.connector.info(), "epochs": [epoch, engine.connector.kv_epoch]}

    def pushed_to() -> list[str]:
        """Decode agents whose NIXL metadata this prefill holds (it pushed to them)."""
        sender = engine.connector.sender
        return sender.decodes.names() if sender is not None else []

    def prefills_known(settle_s: float = 0.0) -> list[str]:
        """Prefill engines whose NIXL metadata this decode holds (it shook hands with them). With
        settle_s, first step the idle engine (as its loop does every 10 ms) until none is left or
        settle_s passed: a sleeping prefill's "forget" notification arrives asynchronously."""
        import time

        receiver = engine.connector.receiver
        deadline = time.monotonic() + settle_s
        while receiver is not None and receiver.peers.snapshot() and time.monotonic() < deadline:
            engine.step()
            time.sleep(0.01)
        return sorted(receiver.peers.snapshot()) if receiver is not None else []

    return {**methods, "sleep_wake": sleep_wake, "pushed_to": pushed_to, "prefills_known": prefills_known}, \
        shutdown, info


def _engine(config: DeploymentConfig, role: str, name: str, staging_slots: int) -> ProcessRPC:
    instance = InstanceSpec(role=role, port=1 if role == "prefill" else 2, engine_id=name, device="cpu")
    return ProcessRPC(build_sleepy_engine, config.model_dump_json(), instance.model_dump_json(), staging_slots)


def _tokens(outs: dict[str, dict]) -> dict[str, list[int]]:
    return {rid: out["tokens"] for rid, out in outs.items()}


@pytest.fixture(scope="module")
def expected(llama_ckpt: Path) -> dict[str, list[int]]:
    return colocated(llama_ckpt, PROMPTS)


def _run_twice_around_a_sleep(llama_ckpt: Path, expected: dict[str, list[int]], mode: str, sleepers: list[str],
                              staging_slots: int) -> dict[str, dict[str, Any]]:
    """PD, then `sleepers` ("prefill", "decode") sleep and wake, then PD again; both equal colocated.
    Returns each sleeper's sleep_wake report."""
    config = pd_config(str(llama_ckpt), "nixl", mode)
    config.model.enable_sleep_mode = True
    tag = f"{'+'.join(sleepers)}-{mode}-{staging_slots}"
    prefill = _engine(config, "prefill", f"P-sleep-{tag}", staging_slots)
    try:
        decode = _engine(config, "decode", f"D-sleep-{tag}", staging_slots)
        try:
            assert _tokens(run_pd(prefill, decode, PROMPTS)) == expected
            known = prefill.call("pushed_to")
            handshakes = decode.call("prefills_known")
            woke = {}
            for role in sleepers:
                woke[role] = {"prefill": prefill, "decode": decode}[role].call("sleep_wake")
                if role == "prefill":
                    # As a serving decode's engine loop would: take the sleeping prefill's "forget"
                    # notification before anything else happens, so a decode that sleeps next no
                    # longer has that prefill in its peer cache.
                    decode.call("prefills_known", 5.0)
            woke["prefill_pushed_to"] = {"before": known, "after_sleeps": prefill.call("pushed_to")}
            woke["decode_knows"] = {"before": handshakes, "after_sleeps": decode.call("prefills_known", 5.0)}
            again = run_pd(prefill, decode, {f"{rid}-2": p for rid, p in PROMPTS.items()})
            assert _tokens(again) == {f"{rid}-2": toks for rid, toks in expected.items()}
            prefill.call("check")
            decode.call("check")
            return woke
        finally:
            decode.close()
    finally:
        prefill.close()


# Pull: prefill sleeps and tells the decode that READs from it to forget it (decode shakes hands anew).
# Push: decode sleeps too, so the prefill side WRITEs into a staging buffer decode re-created; or only
# the prefill sleeps, and tells decode to forget it.
@pytest.mark.parametrize("mode, sleepers", [("pull", ["prefill"]), ("push", ["prefill", "decode"]),
                                            ("push", ["prefill"])])
def test_sleep_frees_and_recreates_the_staging_buffer(llama_ckpt: Path, expected: dict[str, list[int]],
                                                      mode: str, sleepers: list[str]) -> None:
    woke = _run_twice_around_a_sleep(llama_ckpt, expected, mode, sleepers, STAGING_SLOTS)
    pushed_to = woke.pop("prefill_pushed_to")
    decode_knows = woke.pop("decode_knows")
    if "decode" in sleepers:  # a sleeping decode drops the prefills' metadata (and their mappings)
        assert len(decode_knows["before"]) == 1 and decode_knows["after_sleeps"] == []
    if "prefill" in sleepers:
        # A sleeping prefill has the decode drop the prefill's metadata (its mapping of the prefill's
        # freed staging buffer would keep that allocated on CUDA): by notification to a decode it
        # pushed to, and in pull mode to one that gave it its connection info at the handshake.
        assert len(decode_knows["before"]) == 1 and decode_knows["after_sleeps"] == []
    if mode == "push" and "decode" in sleepers:
        # Decode asked the prefill to drop its metadata before freeing the buffer the prefill had
        # mapped (on CUDA the mapping would keep the freed buffer allocated), even though the
        # prefill slept first and so had already left the decode's peer cache.
        assert len(pushed_to["before"]) == 1 and pushed_to["after_sleeps"] == []
    for role, report in woke.items():
        assert report["asleep"]["staging"] is None, f"{role}: the staging buffer should be gone while asleep"
        assert report["awake"]["staging"]["slots"] == STAGING_SLOTS, role
        assert report["epochs"][1] == report["epochs"][0] + 1, f"{role}: its KV memory was registered anew"


def test_push_into_a_decode_that_woke_up(llama_ckpt: Path, expected: dict[str, list[int]]) -> None:
    """Decode's KV tensors move (no staging): prefill must load decode's new NIXL metadata to push."""
    woke = _run_twice_around_a_sleep(llama_ckpt, expected, "push", ["decode"], 0)
    assert woke["decode_knows"]["after_sleeps"] == []
    assert woke["decode"]["moved"], "the CPU sleep backend should have given the KV new storage"


def build_sleepy_connector(config_json: str, instance_json: str, spec_kwargs: dict[str, Any],
                           staging_slots: int) -> Built:
    handlers, close, info = build_connector(config_json, instance_json, spec_kwargs, staging_slots)
    connector = handlers["info"].__self__

    def before_sleep() -> dict[str, Any]:
        connector.before_sleep()
        return connector.info()

    def wake() -> dict[str, Any]:
        connector.register_kv_caches(connector.spec)
        return {**connector.info(), "kv_epoch": connector.kv_epoch}

    return {**handlers, "before_sleep": before_sleep, "wake": wake}, close, info


def test_sleep_refused_while_a_staging_slot_is_held() -> None:
    kv = KVTransferConfig(transfer_mode="pull", handshake_timeout_seconds=3.0, transfer_timeout_seconds=30.0,
                          engine_id="unused")
    config = secured(DeploymentConfig(device="cpu", kv_transfer=kv))
    instance = InstanceSpec(role="prefill", port=1, engine_id="P-staged", device="cpu")
    prefill = ProcessRPC(build_sleepy_connector, config.model_dump_json(), instance.model_dump_json(),
                         {"block_size": 4, "num_blocks": 16}, 3)
    try:
        _, params = prefill.call("request_finished", "req-held", list(range(9)),
                                 RemoteDecodeRequest(do_remote_decode=True), [[4, 5, 6]])
        host, port = params.remote_host, params.remote_port
        # What a pulling decode does first: prefill copies the blocks into slots until "unstage".
        staged = client.call(host, port, {"type": "stage", "request_id": "req-held", "blocks": [[4, 5]],
                                          "reader": "D", "load": "load-0", "seconds": 10.0},
                             10.0, "stage request", KEYS)
        with pytest.raises(RuntimeError, match=r"2 of 3 KV staging slots are in use by request\(s\) req-held"):
            prefill.call("before_sleep")
        assert prefill.call("info")["staging"]["slots"] == 3, "a refused sleep must keep the buffer"
        client.call(host, port, {"type": "unstage", "ticket": staged["ticket"]}, 10.0, "unstage request", KEYS)
        assert prefill.call("before_sleep")["staging"] is None
        woke = prefill.call("wake")
        assert woke["staging"]["slots"] == 3 and woke["kv_epoch"] == 1
    finally:
        prefill.close()
