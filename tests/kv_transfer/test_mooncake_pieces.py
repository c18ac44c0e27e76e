"""Mooncake connector pieces in one process: vLLM #39548's device binding on the transfer threads, signed
notifications, what check-config and the skip line say when Mooncake is missing, transport in /info
and the log, and deregistration around sleep."""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections import Counter
from typing import Any

import pytest

from pdlaunch.config import mooncake_install
from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.config.rules.host import kv_connector_problems
from pdlaunch.kv_transfer.factory import create_connector
from pdlaunch.kv_transfer.fault import ENV
from pdlaunch.kv_transfer.mooncake import connector as mooncake_connector
from pdlaunch.kv_transfer.mooncake.agent import MooncakeAgent
from pdlaunch.kv_transfer.mooncake.connector import MooncakeConnector
from pdlaunch.kv_transfer.mooncake.engine import MooncakeEngine
from pdlaunch.kv_transfer.mooncake.sender import TransferPool
from pdlaunch.kv_transfer.notifications import ReadDone, encode_notification
from pdlaunch.kv_transfer.params import RemoteDecodeRequest
from pdlaunch.memory import platform
from tests.kv_transfer.deployment_secret import TEST_SECRET, secured
from tests.kv_transfer.mooncake_metadata import metadata_server
from tests.kv_transfer.mooncake_skip import requires_mooncake
from tests.kv_transfer.pd_procs import make_spec, wait_events


def _connector(role: str, engine_id: str, mode: str = "auto") -> MooncakeConnector:
    kv = KVTransferConfig(connector="mooncake", transfer_mode=mode, verify_kv=True)
    connector = create_connector(secured(DeploymentConfig(device="cpu", kv_transfer=kv)),
                                 InstanceSpec(role=role, port=1, engine_id=engine_id, device="cpu"))
    assert isinstance(connector, MooncakeConnector)
    return connector


def _push(prefill: MooncakeConnector, decode: MooncakeConnector, rid: str) -> None:
    prompt = list(range(4 * 3 + 1))
    _, params = prefill.request_finished(rid, prompt, RemoteDecodeRequest(do_remote_decode=True), [[1, 2, 3, 4]])
    assert params is not None
    decode.start_load(rid, prompt, params, [[5, 6, 7, 8]], 0, decode.get_num_new_matched_tokens(rid, prompt, params, 0))
    ev = wait_events(decode.get_finished, lambda e: rid in e.finished_recving or rid in e.failed_recving, 30.0, rid)
    assert rid in ev.finished_recving, ev.failed_recving
    wait_events(prefill.get_finished, lambda e: rid in e.finished_sending, 30.0, f"prefill freeing {rid}")


@requires_mooncake
def test_transfer_threads_bind_the_device_captured_before_the_engine_once_each(monkeypatch: pytest.MonkeyPatch
                                                                             ) -> None:
    events: list[tuple[str, Any]] = []
    real_set_device = platform.set_device

    def set_device_spy(index: int) -> None:
        events.append(("set_device", (threading.current_thread().name, index)))
        real_set_device(index)

    class EngineSpy(MooncakeEngine):
        def __init__(self, *args: Any) -> None:
            events.append(("engine", platform.bound_device_index()))
            super().__init__(*args)

        def transfer(self, *args: Any) -> None:
            events.append(("transfer", (threading.current_thread().name, platform.bound_device_index())))
            super().transfer(*args)

    monkeypatch.setattr(platform, "current_device_index", lambda: 3)
    monkeypatch.setattr(platform, "set_device", set_device_spy)
    monkeypatch.setattr(mooncake_connector, "MooncakeEngine", EngineSpy)
    prefill, decode = _connector("prefill", "seed-P"), _connector("decode", "seed-D")
    try:
        # The index was captured and bound before each transfer engine was created.
        assert [e for e in events if e[0] == "engine"] == [("engine", 3), ("engine", 3)]
        assert prefill.device_index == decode.device_index == 3
        prefill.register_kv_caches(make_spec(seed=1))
        decode.register_kv_caches(make_spec(seed=2))
        for i in range(6):
            _push(prefill, decode, f"r{i}")
    finally:
        decode.shutdown()
        prefill.shutdown()
        real_set_device(0)
    transfers = [data for kind, data in events if kind == "transfer"]
    assert len(transfers) == 6 and all(name.startswith("pdlaunch-mooncake-xfer") and index == 3
                                       for name, index in transfers)
    # The pool initializer bound each transfer thread exactly once, with the captured index.
    pool_binds = Counter(data for kind, data in events if kind == "set_device" and data[0].startswith(
        "pdlaunch-mooncake-xfer"))
    assert {name for name, _ in transfers} <= {name for name, _ in pool_binds}
    assert all(index == 3 and count == 1 for (_, index), count in pool_binds.items())


@requires_mooncake
def test_notifications_without_the_deployment_mac_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    pool = TransferPool(0, workers=1)
    ours = MooncakeAgent("ours", MooncakeEngine("127.0.0.1", "tcp", None), pool, TEST_SECRET)
    other = MooncakeAgent("other", MooncakeEngine("127.0.0.1", "tcp", None), TransferPool(0, 1), "x" * 32)
    try:
        for agent in (ours, other):
            agent.add_remote(ours.metadata())
        message = encode_notification(ReadDone(load="load-0", kind="release", request_id="someone-else", reader="d"))
        other.notify("ours", message)  # MACed with another deployment's key
        other.engine.notify(ours.engine.session_id, "ours", message.decode())  # no MAC at all
        ours.notify("ours", message)
        received: list[bytes] = []
        dropped = "dropped a Mooncake notification without a valid MAC"
        deadline = time.monotonic() + 10.0
        while (not received or dropped not in caplog.text) and time.monotonic() < deadline:
            received += ours.new_notifs()
            time.sleep(0.01)
        time.sleep(0.2)
        received += ours.new_notifs()
        assert received == [message]  # only the one MACed with this deployment's key
        assert dropped in caplog.text
    finally:
        other.close()
        ours.close()


def test_missing_package_and_system_library_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def failing(error: ImportError) -> Any:
        def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
            if name.startswith("mooncake"):
                raise error
            return real_import(name, *args, **kwargs)
        return fake_import

    monkeypatch.setattr(builtins, "__import__", failing(ModuleNotFoundError("No module named 'mooncake'",
                                                                            name="mooncake")))
    assert "package is not installed (mooncake-transfer-engine-non-cuda)" in mooncake_install.missing_reason()
    config = DeploymentConfig(device="cpu", kv_transfer=KVTransferConfig(connector="mooncake"))
    (problem,) = kv_connector_problems(config)
    assert problem.field == "kv_transfer.connector" and "apt-get install libibverbs1" in problem.message
    monkeypatch.setattr(builtins, "__import__", failing(ImportError(
        "libibverbs.so.1: cannot open shared object file: No such file or directory")))
    assert "the system library libibverbs.so.1 that Mooncake links is missing" in mooncake_install.missing_reason()
    assert kv_connector_problems(DeploymentConfig(device="cpu")) == []  # nixl: nothing to say


@requires_mooncake
def test_info_and_log_state_the_transport(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pdlaunch.kv_transfer.mooncake.connector"):
        decode = _connector("decode", "info-D")
    try:
        info = decode.info()
        assert (info["connector"], info["transport"], info["transfer_mode"]) == ("mooncake", "tcp", "push")
        assert info["metadata"] == "P2P handshake (no metadata server)" and info["session"].startswith("127.0.0.1:")
        assert "transport tcp (no RDMA device" in caplog.text
    finally:
        decode.shutdown()


@requires_mooncake
def test_sleep_deregisters_and_wake_registers_the_new_storage() -> None:
    prefill, decode = _connector("prefill", "sleep-P"), _connector("decode", "sleep-D")
    try:
        spec = make_spec(seed=1)
        prefill.register_kv_caches(spec)
        decode.register_kv_caches(make_spec(seed=2))
        _push(prefill, decode, "before")
        prefill.before_sleep()
        assert prefill.transfer_engine._registered == []
        woke = make_spec(seed=3)  # what the CPU sleep backend does: new storage for the same tensors
        spec.kv_caches = woke.kv_caches
        prefill.register_kv_caches(spec)
        assert prefill.kv_epoch == 1
        assert prefill.transfer_engine._registered == [t.data_ptr() for t in woke.kv_caches]
        _push(prefill, decode, "after")
    finally:
        decode.shutdown()
        prefill.shutdown()


@requires_mooncake
def test_metadata_server_option_for_clusters(tmp_path: Any) -> None:
    """Peers register and look up their segments in Mooncake's HTTP metadata server instead of the P2P
    handshake (what kv_transfer.mooncake_metadata_server is for on clusters)."""
    with metadata_server() as url:
        kv = KVTransferConfig(connector="mooncake", mooncake_metadata_server=url, verify_kv=True)
        config = secured(DeploymentConfig(device="cpu", kv_transfer=kv))
        prefill, decode = (create_connector(config, InstanceSpec(role=role, port=1, engine_id=f"meta-{role}",
                                                                  device="cpu")) for role in ("prefill", "decode"))
        try:
            assert decode.info()["metadata"] == f"server {url}"
            prefill.register_kv_caches(make_spec(seed=1))
            decode.register_kv_caches(make_spec(seed=2))
            _push(prefill, decode, "via-metadata-server")
        finally:
            decode.shutdown()
            prefill.shutdown()


def test_cuda_kv_with_the_cpu_only_wheel_is_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mooncake_install, "missing_reason", lambda: None)
    monkeypatch.setattr(mooncake_install, "_installed", lambda name: name == mooncake_install.PACKAGE)
    kv = KVTransferConfig(connector="mooncake")
    (problem,) = kv_connector_problems(DeploymentConfig(device="cuda", kv_transfer=kv))
    assert problem.field == "kv_transfer.connector" and "CPU-only wheel" in problem.message
    assert "pip install mooncake-transfer-engine" in problem.message
    assert kv_connector_problems(DeploymentConfig(device="cpu", kv_transfer=kv)) == []
    monkeypatch.setattr(mooncake_install, "_installed", lambda name: True)  # a CUDA build is there too
    assert kv_connector_problems(DeploymentConfig(device="cuda", kv_transfer=kv)) == []


@requires_mooncake
def test_injected_failure_releases_the_prefill_through_a_signed_notification(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    prefill = _connector("prefill", "fault-P", mode="pull")
    monkeypatch.setenv(ENV, "1.0")
    decode = _connector("decode", "fault-D", mode="pull")
    try:
        prefill.register_kv_caches(make_spec(seed=1))
        decode.register_kv_caches(make_spec(seed=2))
        prompt = list(range(9))
        _, params = prefill.request_finished("r", prompt, RemoteDecodeRequest(do_remote_decode=True), [[1, 2, 3]])
        decode.start_load("r", prompt, params, [[4, 5, 6]], 0, 8)
        ev = wait_events(decode.get_finished, lambda e: "r" in e.failed_recving, 30.0, "the injected failure")
        assert "injected by PDLAUNCH_TEST_FAIL_TRANSFER_RATE" in ev.failed_recving["r"]
        # The decode's "release" notification (MACed, over Mooncake) frees the hold long before its lease.
        wait_events(prefill.get_finished, lambda e: "r" in e.finished_sending, 10.0, "prefill releasing r")
        assert prefill.sender is not None and prefill.sender.num_held() == 0
    finally:
        decode.shutdown()
        prefill.shutdown()


@requires_mooncake
def test_a_registration_failing_halfway_leaves_nothing_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The third KV tensor failing to register left the first two registered with Mooncake, known to
    nobody (deregister before a sleep skipped them) until the engine closed. Now they are undone."""
    from pdlaunch.errors import KVTransferError

    prefill = _connector("prefill", "halfway-P")
    try:
        engine = prefill.transfer_engine
        real = engine.register
        calls: list[int] = []

        def third_fails(address: int, nbytes: int, location: str) -> None:
            calls.append(address)
            if len(calls) == 3:
                raise KVTransferError(f"Mooncake could not register {nbytes} bytes at {address:#x}: code -1")
            real(address, nbytes, location)

        monkeypatch.setattr(engine, "register", third_fails)
        spec = make_spec(seed=4, groups=3, sliding_window=[None, 8, 8])  # three KV tensors
        with pytest.raises(KVTransferError, match="could not register"):
            prefill.register_kv_caches(spec)
        assert len(calls) == 3 and engine._registered == []
        monkeypatch.setattr(engine, "register", real)
        prefill.register_kv_caches(spec)  # a retry registers everything once
        assert engine._registered == [t.data_ptr() for t in spec.kv_caches]
    finally:
        prefill.shutdown()
