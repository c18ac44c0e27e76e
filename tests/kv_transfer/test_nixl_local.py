"""NIXL connector behaviour that needs no second process: leases, binding, device, compatibility."""

from __future__ import annotations

import socket
import threading

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVConnectorEvents
from pdlaunch.kv_transfer.factory import create_connector
from pdlaunch.kv_transfer.nixl_connector import NixlConnector
from pdlaunch.kv_transfer.params import PrefillAnswer, RemoteDecodeRequest
from pdlaunch.memory import platform
from pdlaunch.metrics.kv_transfer import KV_EXPIRED_REQUESTS
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.pd_procs import make_spec, wait_events


def _connector(role: str, engine_id: str, **kv: object) -> NixlConnector:
    config = secured(DeploymentConfig(device="cpu", kv_transfer=KVTransferConfig(**kv)))
    connector = create_connector(config, InstanceSpec(role=role, port=1, engine_id=engine_id, device="cpu"))
    assert isinstance(connector, NixlConnector)
    return connector


def _wait(connector: NixlConnector, predicate, timeout: float = 20.0) -> KVConnectorEvents:
    return wait_events(connector.get_finished, predicate, timeout, "connector events")


def test_lease_expiry_frees_blocks_and_counts() -> None:
    prefill = _connector("prefill", "lease-P", kv_lease_seconds=0.2)
    try:
        prefill.register_kv_caches(make_spec())
        before = KV_EXPIRED_REQUESTS._value.get()
        hold, params = prefill.request_finished("r1", [1, 2, 3, 4, 5],
                                                RemoteDecodeRequest(do_remote_decode=True), [[3, 4]])
        assert hold and params is not None
        assert prefill.info()["held_requests"] == 1
        ev = _wait(prefill, lambda e: "r1" in e.finished_sending)
        assert ev.finished_sending == {"r1"}
        assert KV_EXPIRED_REQUESTS._value.get() == before + 1
        assert prefill.info()["held_requests"] == 0
        # A decode that asks for the push now is told why it cannot have it.
        with pytest.raises(KVTransferError, match="lease"):
            prefill.sender.holds.claim("r1", [[]], prefill.spec.block_bytes, prefill.spec, exclusive=True)
        # Reported once only.
        assert "r1" not in prefill.get_finished().finished_sending
    finally:
        prefill.shutdown()


def test_request_without_remote_decode_is_not_held() -> None:
    prefill = _connector("prefill", "plain-P")
    try:
        prefill.register_kv_caches(make_spec())
        assert prefill.request_finished("r", [1, 2], None, [[1]]) == (False, None)
        no_decode = RemoteDecodeRequest(do_remote_decode=False)
        assert prefill.request_finished("r", [1, 2], no_decode, [[1]]) == (False, None)
        assert prefill.info()["held_requests"] == 0
    finally:
        prefill.shutdown()


def test_side_channel_port_in_use_names_the_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        prefill = _connector("prefill", "bind-P", side_channel_port=port)
        try:
            with pytest.raises(KVTransferError) as err:
                prefill.register_kv_caches(make_spec())
            assert err.value.field == "kv_transfer.side_channel_port"
            assert f"127.0.0.1:{port}" in str(err.value)
        finally:
            prefill.shutdown()


def test_sender_threads_bind_the_device_captured_before_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[int | None] = []
    import pdlaunch.kv_transfer.nixl_connector as nc

    real_agent = nc.KVAgent

    def agent_spy(name: str):
        created.append(platform.bound_device_index())  # what the creating thread had bound by then
        return real_agent(name)

    monkeypatch.setattr(platform, "current_device_index", lambda: 3)
    monkeypatch.setattr(nc, "KVAgent", agent_spy)
    prefill = _connector("prefill", "device-P")
    try:
        assert prefill.device_index == 3
        assert created == [3]
        barrier = threading.Barrier(2, timeout=10)

        def probe() -> tuple[str, int | None]:
            barrier.wait()  # both pool threads exist and each answers for itself
            return threading.current_thread().name, platform.bound_device_index()

        futures = [prefill.sender.executor.submit(probe) for _ in range(2)]
        answers = [f.result(timeout=10) for f in futures]
        assert len({name for name, _ in answers}) == 2
        assert all(name.startswith("pdlaunch-kv-sender") and device == 3 for name, device in answers)
    finally:
        prefill.shutdown()
        platform.set_device(0)


def test_incompatible_block_size_names_field_values_and_fix() -> None:
    prefill = _connector("prefill", "compat-P")
    decode = _connector("decode", "compat-D", handshake_timeout_seconds=5.0)
    try:
        prefill.register_kv_caches(make_spec(block_size=4))
        decode.register_kv_caches(make_spec(block_size=8))
        _, params = prefill.request_finished("r", list(range(9)),
                                             RemoteDecodeRequest(do_remote_decode=True), [[1, 2, 3]])
        decode.start_load("r", list(range(9)), params, [[4, 5]], 0, 8)
        message = _wait(decode, lambda e: "r" in e.failed_recving).failed_recving["r"]
        assert "block_size differs (prefill engine compat-P: 4, this engine: 8)" in message
        assert "cache.block_size" in message and "same --block-size" in message
    finally:
        decode.shutdown()
        prefill.shutdown()


def test_decode_info_reports_mode_and_reason() -> None:
    decode = _connector("decode", "info-D")
    try:
        decode.register_kv_caches(make_spec())
        info = decode.info()
        assert info["transfer_mode"] == "pull" and "CPU DRAM" in info["transfer_mode_reason"]
        assert info["engine_id"] == "info-D" and info["role"] == "decode"
    finally:
        decode.shutdown()
    push = _connector("decode", "info-D2", transfer_mode="push")
    try:
        assert push.info()["transfer_mode"] == "push"
    finally:
        push.shutdown()


def test_params_for_another_prompt_length_fail_clearly() -> None:
    decode = _connector("decode", "len-D")
    try:
        decode.register_kv_caches(make_spec())
        params = PrefillAnswer(do_remote_prefill=True, remote_engine_id="P", remote_block_ids=[[1, 2]],
                               remote_host="127.0.0.1", remote_port=1, remote_request_id="x", num_prompt_tokens=7)
        decode.start_load("r", [1, 2, 3], params, [[1]], 0, 2)
        message = decode.get_finished().failed_recving["r"]
        assert "3 tokens here but 7" in message
    finally:
        decode.shutdown()


def test_factory_roles(tmp_path) -> None:
    from pdlaunch.kv_transfer.storage_connector import StorageConnector

    config = secured(DeploymentConfig(device="cpu"))
    assert create_connector(config, InstanceSpec(role="colocated", port=1, engine_id="c")) is None
    storage = secured(DeploymentConfig(device="cpu", kv_transfer=KVTransferConfig(connector="storage",
                                                                             storage_path=str(tmp_path))))
    assert isinstance(create_connector(storage, InstanceSpec(role="decode", port=1, engine_id="d")), StorageConnector)
