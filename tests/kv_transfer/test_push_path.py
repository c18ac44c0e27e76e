"""Push (prefill WRITEs into decode's blocks): bytes land, and the time splits into phases the bench reports."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pdlaunch.bench.kv_transfer import run_kv_transfer_bench
from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.kv_transfer.factory import create_connector
from pdlaunch.kv_transfer.nixl_connector import NixlConnector
from pdlaunch.kv_transfer.params import RemoteDecodeRequest
from pdlaunch.kv_transfer.prefill.push_sender import wait_write
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.pd_procs import make_spec, wait_events


def _connector(role: str, engine_id: str, mode: str) -> NixlConnector:
    config = secured(DeploymentConfig(device="cpu", kv_transfer=KVTransferConfig(transfer_mode=mode)))
    connector = create_connector(config, InstanceSpec(role=role, port=1, engine_id=engine_id, device="cpu"))
    assert isinstance(connector, NixlConnector)
    return connector


def test_push_moves_scattered_blocks_and_records_its_phases() -> None:
    prefill = _connector("prefill", "push-path-P", "auto")
    decode = _connector("decode", "push-path-D", "push")
    try:
        p_spec, d_spec = make_spec(seed=1), make_spec(seed=2)
        prefill.register_kv_caches(p_spec)
        decode.register_kv_caches(d_spec)
        d_spec.kv_caches[0].zero_()
        prompt = list(range(4 * 5 + 1))  # 5 full blocks moved; the last token is recomputed
        remote_blocks = [3, 4, 5, 10, 11, 2]  # runs 3-5, 10-11 on the prefill side
        local_blocks = [7, 8, 20, 21, 22, 1]  # runs 7-8, 20-22 on the decode side
        _, params = prefill.request_finished("r", prompt, RemoteDecodeRequest(do_remote_decode=True), [remote_blocks])
        assert params is not None
        external = decode.get_num_new_matched_tokens("r", prompt, params, 0)
        decode.start_load("r", prompt, params, [local_blocks], 0, external)
        ev = wait_events(decode.get_finished, lambda e: "r" in e.finished_recving or "r" in e.failed_recving,
                         30.0, "the push of request r")
        assert ev.failed_recving == {}
        wait_events(prefill.get_finished, lambda e: "r" in e.finished_sending, 30.0, "prefill to free request r")
        for local, remote in zip(local_blocks[:5], remote_blocks[:5]):
            assert torch.equal(d_spec.kv_caches[0][local], p_spec.kv_caches[0][remote])
        assert int(d_spec.kv_caches[0][local_blocks[5]].count_nonzero()) == 0  # the recomputed block is not sent

        (timing,) = prefill.sender.push_timings()
        assert timing.request_id == "r"
        assert timing.num_bytes == 5 * p_spec.block_bytes[0]
        assert timing.received <= timing.posting <= timing.posted <= timing.done
    finally:
        decode.shutdown()
        prefill.shutdown()


class _FakeXfer:
    """A WRITE that completes after `checks` state() calls, or never (None)."""

    def __init__(self, checks: int | None) -> None:
        self.checks = checks
        self.calls = 0

    def state(self) -> str:
        self.calls += 1
        return "DONE" if self.checks is not None and self.calls >= self.checks else "PROC"


def test_wait_write_checks_until_done() -> None:
    xfer = _FakeXfer(checks=50)
    start = time.monotonic()
    assert wait_write(xfer, start, start + 30.0) == "DONE"  # type: ignore[arg-type]
    assert xfer.calls == 50


def test_wait_write_gives_up_at_the_deadline() -> None:
    xfer = _FakeXfer(checks=None)
    start = time.monotonic()
    assert wait_write(xfer, start, start + 0.1) == "PROC"  # type: ignore[arg-type]
    assert time.monotonic() >= start + 0.1


@pytest.mark.e2e
def test_bench_splits_push_time_into_phases() -> None:
    rows = run_kv_transfer_bench(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_size=8,
                                 num_tokens_list=[33], modes=["pull", "push"], device="cpu", iterations=2)
    pull, push = rows
    assert pull["push_phases_ms"] is None
    phases = push["push_phases_ms"]
    assert set(phases) == {"request", "prepare", "post", "write", "notify"}
    assert all(v >= 0 for v in phases.values())
    assert push["verified"] is True
    # The phases are consecutive slices of one load (medians of each, so only roughly its median).
    assert sum(phases.values()) <= 3 * push["seconds"] * 1e3


def test_the_thread_that_posts_a_push_write_has_the_instance_device_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whichever thread posts a push's WRITE (a sender thread) must run on the instance's device: CUDA's current
    device is per thread (vLLM #39548). On CPU `set_device` records the index, so an instance "on device 3" shows
    whether the posting thread bound it."""
    from pdlaunch.memory import platform

    monkeypatch.setattr(platform, "current_device_index", lambda: 3)
    prefill = _connector("prefill", "push-device-P", "auto")
    decode = _connector("decode", "push-device-D", "push")
    posted: list[tuple[str, int | None]] = []
    real_transfer = prefill.agent.transfer

    def spy(op: str, *args: object, **kwargs: object) -> object:
        posted.append((threading.current_thread().name, platform.bound_device_index()))
        return real_transfer(op, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(prefill.agent, "transfer", spy)
    try:
        p_spec, d_spec = make_spec(seed=1), make_spec(seed=2)
        prefill.register_kv_caches(p_spec)
        decode.register_kv_caches(d_spec)
        prompt = list(range(4 * 2 + 1))
        _, params = prefill.request_finished("r", prompt, RemoteDecodeRequest(do_remote_decode=True), [[3, 4, 5]])
        external = decode.get_num_new_matched_tokens("r", prompt, params, 0)
        decode.start_load("r", prompt, params, [[7, 8, 9]], 0, external)
        ev = wait_events(decode.get_finished, lambda e: "r" in e.finished_recving or "r" in e.failed_recving,
                         30.0, "the push of request r")
        assert ev.failed_recving == {}
        assert torch.equal(d_spec.kv_caches[0][7], p_spec.kv_caches[0][3])
        (thread, device), = posted
        assert device == 3, f"the WRITE was posted by {thread} with device {device} bound"
    finally:
        decode.shutdown()
        prefill.shutdown()
        platform.set_device(0)
