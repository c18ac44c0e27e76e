"""config/ray_init.py: ray.init run in a helper thread, the main thread waiting (bounded) for it. What ray.init
raises is raised in the caller; a ray.init that never returns is named after INIT_TIMEOUT_S, and Ray's exit hook,
which would tear the running ray.init down, is dropped. In-process, a stand-in ray module; no cluster."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from pdlaunch.config import ray_init, ray_thread
from pdlaunch.errors import PdlaunchError


def _shutdown() -> None:
    """The stand-in's ray.shutdown (registered with atexit only to see it dropped)."""


def test_ray_init_runs_outside_the_main_thread_and_its_error_is_raised_here() -> None:
    threads: list[str] = []

    def init(**kwargs: object) -> None:
        threads.append(threading.current_thread().name)
        raise ConnectionError(f"no GCS at {kwargs['address']}")

    with pytest.raises(ConnectionError, match="no GCS at 10.0.0.5:6379"):
        ray_init.init_in_thread(SimpleNamespace(init=init, shutdown=_shutdown), "10.0.0.5:6379", namespace="x")
    assert threads == ["ray.init"]


def test_a_ray_init_that_never_returns_is_named_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_init, "INIT_TIMEOUT_S", 1.0)
    release = threading.Event()
    unregistered: list[object] = []
    monkeypatch.setattr(ray_thread.atexit, "unregister", unregistered.append)
    monkeypatch.setattr(ray_thread, "_running", None)  # the call left running: reset after the test
    monkeypatch.setattr(ray_init, "_tried", False)
    started = time.monotonic()
    try:
        with pytest.raises(PdlaunchError) as caught:
            ray_init.init_in_thread(SimpleNamespace(init=lambda **_: release.wait(30), shutdown=_shutdown),
                                    "10.0.0.5:6379")
    finally:
        release.set()
    assert time.monotonic() - started < 10.0
    assert caught.value.field == "launcher.ray_address"
    assert "ray.init did not return within 1s of connecting to the Ray cluster at 10.0.0.5:6379" in \
        caught.value.message, caught.value.render()
    assert unregistered == [_shutdown], "Ray's exit hook would tear down the ray.init still running"
    assert ray_thread.cut_short() == "connecting to the Ray cluster at 10.0.0.5:6379"  # the exit must not either


def test_a_late_ray_init_on_auto_names_where_auto_looked(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` (the default launcher.ray_address) named "the Ray cluster at auto"; RAY_ADDRESS unset, it is the one a
    `ray start` on this machine runs, and `ray status` (no --address) asks that one."""
    monkeypatch.setattr(ray_init, "INIT_TIMEOUT_S", 1.0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    release = threading.Event()
    monkeypatch.setattr(ray_thread.atexit, "unregister", lambda hook: None)
    monkeypatch.setattr(ray_thread, "_running", None)  # the call left running: reset after the test
    monkeypatch.setattr(ray_init, "_tried", False)
    try:
        with pytest.raises(PdlaunchError) as caught:
            ray_init.init_in_thread(SimpleNamespace(init=lambda **_: release.wait(30), shutdown=_shutdown), "auto")
    finally:
        release.set()
    assert "ray.init did not return within 1s of connecting to the Ray cluster this machine is part of " \
           "(launcher.ray_address auto: RAY_ADDRESS is not set: the one a `ray start` on this machine runs)" in \
        caught.value.message, caught.value.render()
    assert "`ray status` there" in (caught.value.hint or ""), caught.value.hint
