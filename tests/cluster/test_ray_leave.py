"""launcher/backends/ray_connect_stop.leave_ray_cluster: at a command's end the driver leaves the cluster itself
(ray.shutdown in a helper thread, Ray's atexit hook dropped), a stop signal meanwhile ending the process at once with
the command's status, then os._exit. What ray.shutdown raises, or one that never returns, is one line, never a
traceback. In-process, a stand-in ray module; os._exit raises instead."""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import SimpleNamespace

import pytest
from rich.console import Console

from pdlaunch.config import ray_init, ray_thread
from pdlaunch.launcher.backends import ray_connect_stop
from tests.cluster.ray_connect_stand_in import Left, RayCalls

STAND_IN_WAIT_S = 30.0  # the longest the stand-in ray.shutdown holds


def _stand_in(monkeypatch: pytest.MonkeyPatch, shutdown: object) -> RayCalls:
    calls = RayCalls()
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: True, shutdown=shutdown))
    monkeypatch.setattr(ray_init, "_tried", True)
    monkeypatch.setattr(os, "_exit", calls.leave)
    return calls


def _leave(code: int, capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(Left) as left:
        ray_connect_stop.leave_ray_cluster(Console(stderr=True), code)
    return left.value.code, " ".join(capfd.readouterr().err.split())


def test_the_driver_leaves_off_the_main_thread_then_the_process_ends(monkeypatch: pytest.MonkeyPatch,
                                                                     capfd: pytest.CaptureFixture[str]) -> None:
    threads: list[str] = []
    _stand_in(monkeypatch, lambda: threads.append(threading.current_thread().name))
    assert _leave(1, capfd) == (1, "")
    assert threads == ["ray.shutdown"]


def test_a_stop_while_the_driver_leaves_keeps_the_commands_status(monkeypatch: pytest.MonkeyPatch,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    release = threading.Event()

    def shutdown() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # seen in the main thread, which waits for this one
        release.wait(STAND_IN_WAIT_S)

    _stand_in(monkeypatch, shutdown)
    try:
        code, err = _leave(0, capfd)
    finally:
        release.set()
    assert (code, err) == (0, "SIGINT received while disconnecting from the Ray cluster; stopping")


def test_a_failing_or_endless_shutdown_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    def failing() -> None:
        raise RuntimeError("the GCS went away")

    _stand_in(monkeypatch, failing)
    assert _leave(1, capfd) == (1, "ray.shutdown failed: RuntimeError: the GCS went away; leaving without it (the "
                                   "cluster sees the driver gone)")
    release = threading.Event()
    _stand_in(monkeypatch, lambda: release.wait(STAND_IN_WAIT_S))
    monkeypatch.setattr(ray_connect_stop, "SHUTDOWN_TIMEOUT_S", 0.5)
    try:
        assert _leave(0, capfd) == (0, "ray.shutdown did not return within 0.5s; leaving without it (the cluster sees "
                                       "the driver gone)")
    finally:
        release.set()
    assert ray_thread.cut_short() == "disconnecting from the Ray cluster"


def test_a_process_that_never_called_ray_init_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _stand_in(monkeypatch, lambda: pytest.fail("ray.shutdown without a ray.init"))
    monkeypatch.setattr(ray_init, "_tried", False)
    before = signal.getsignal(signal.SIGINT)
    ray_connect_stop.leave_ray_cluster(Console(stderr=True), 0)
    assert not calls.left.is_set() and signal.getsignal(signal.SIGINT) is before
