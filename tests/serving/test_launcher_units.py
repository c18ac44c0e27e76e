"""Launcher pieces without an engine: the port/device/engine_id plan, and child process supervision."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from pdlaunch.config.addresses import port_is_free
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.plan import plan_deployment
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.launcher.process import ChildProcess, signals_deferred, stop_all


def _cfg(**data: object) -> DeploymentConfig:
    return DeploymentConfig.model_validate({"device": "cpu", "proxy": {"port": 0}, **data})


def test_free_ports_are_distinct_and_engine_ids_per_instance() -> None:
    cfg = _cfg(instances=[{"role": "prefill", "count": 2}, {"role": "decode", "count": 1, "tp": 2}],
               kv_transfer={"engine_id": "base"})
    plan = plan_deployment(cfg)
    specs = [i.spec for i in plan.instances]
    assert [s.name for s in specs] == ["prefill-0", "prefill-1", "decode-0"]
    assert [s.engine_id for s in specs] == ["base-prefill-0", "base-prefill-1", "base-decode-0"]
    ports = [plan.proxy_port] + [s.port for s in specs] + [s.side_channel_port for s in specs]
    ports += [specs[2].side_channel_port + 1, specs[2].master_port]  # TP 2: one side-channel port per rank
    assert len(set(ports)) == len(ports) and all(ports)
    assert specs[0].master_port is None and specs[2].tp == 2
    assert all(s.device == "cpu" and s.devices == [] for s in specs)


def test_configured_ports_follow_the_config_port_plan() -> None:
    alloc = PortAllocator("127.0.0.1")
    base = alloc.free_range(8, "test")
    cfg = _cfg(proxy={"port": base}, kv_transfer={"side_channel_port": base + 4},
               instances=[{"role": "prefill", "count": 2, "base_port": base + 1}, {"role": "decode", "count": 1}])
    plan = plan_deployment(cfg)
    assert plan.proxy_url == f"http://127.0.0.1:{base}"
    prefill0, prefill1, decode0 = (i.spec for i in plan.instances)
    assert (prefill0.port, prefill1.port) == (base + 1, base + 2)
    assert (prefill0.side_channel_port, prefill1.side_channel_port, decode0.side_channel_port) == (
        base + 4, base + 5, base + 6)


def test_port_in_use_names_the_field() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        assert not port_is_free("127.0.0.1", busy)
        with pytest.raises(PdlaunchError) as err:
            plan_deployment(_cfg(proxy={"port": busy}))
        assert err.value.field == "proxy.port" and str(busy) in err.value.message
        with pytest.raises(PdlaunchError) as err:
            plan_deployment(_cfg(instances=[{"role": "prefill", "base_port": busy}, {"role": "decode"}]))
        assert err.value.field == "instances[0].base_port"


def test_colocated_instance_gets_no_side_channel() -> None:
    plan = plan_deployment(_cfg(colocated=True, instances=[{"role": "colocated"}]))
    (inst,) = plan.instances
    assert inst.spec.role == "colocated" and inst.spec.side_channel_port is None


def test_other_nodes_groups_need_a_base_port() -> None:
    nodes = {"nodes": [{"address": "127.0.0.1"}, {"address": "10.0.0.2"}]}
    cfg = _cfg(parallel=nodes, instances=[{"role": "prefill"}, {"role": "decode", "node": 1}])
    with pytest.raises(PdlaunchError) as err:
        plan_deployment(cfg)
    assert err.value.field == "instances[1].base_port"
    cfg = _cfg(parallel=nodes, instances=[{"role": "prefill"}, {"role": "decode", "node": 1, "base_port": 9100}])
    plan = plan_deployment(cfg)
    assert [i.local for i in plan.instances] == [True, False]
    assert plan.instances[1].url == "http://10.0.0.2:9100"


def _wait_pid_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_stop_kills_the_whole_group_and_reaps(tmp_path: Path) -> None:
    # A child that ignores SIGTERM and has a grandchild (like a TP worker) in its group.
    script = ("import os, signal, subprocess, sys, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              "print('grandchild', p.pid, flush=True)\n"
              "time.sleep(600)\n")
    child = ChildProcess("stubborn", [sys.executable, "-c", script], tmp_path / "stubborn.log")
    child.start()
    deadline = time.monotonic() + 20
    while "grandchild" not in "".join(child.tail()):
        assert time.monotonic() < deadline, "the test child did not start within 20s"
        time.sleep(0.05)
    grandchild = int(child.tail()[-1].split()[1])
    child.stop(term_timeout=0.5)
    assert child.poll() == -signal.SIGKILL
    assert _wait_pid_gone(grandchild), "the grandchild outlived its process group's stop"


def test_stop_all_and_tail(tmp_path: Path) -> None:
    children = [ChildProcess(f"c{i}", [sys.executable, "-c", f"print('line {i}'); import time; time.sleep(600)"],
                             tmp_path / f"c{i}.log") for i in range(2)]
    for child in children:
        child.start()
    deadline = time.monotonic() + 20
    while not all(child.tail() for child in children):
        assert time.monotonic() < deadline, "the test children printed nothing within 20s"
        time.sleep(0.05)
    assert children[1].tail() == ["line 1"]
    stop_all(children, term_timeout=5)
    assert [child.poll() for child in children] == [-signal.SIGTERM, -signal.SIGTERM]


def test_a_signal_during_a_child_start_reaches_its_handler_after_the_start(tmp_path: Path) -> None:
    """`bench compare` raises KeyboardInterrupt from SIGTERM: raised inside Popen (after the fork) or before the
    child is registered, the child ran on unstopped. Deferred, it comes once the child is known."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("Python runs signal handlers on the main thread only")
    seen: list[int] = []

    def interrupt(signum: int, _: object) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    child = ChildProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "s.log")
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                child.start()
                assert seen == [] and child.running  # held: the start went through
        assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is interrupt  # the launcher's handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)
        child.stop(5.0)
    assert child.poll() is not None
