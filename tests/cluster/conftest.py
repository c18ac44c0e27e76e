"""Fixtures the cluster backend tests share."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from pdlaunch.config import ray_init, ray_thread


@pytest.fixture
def term_guard() -> Iterator[None]:
    """A SIGTERM that arrives after run_slurm restored the handlers must not end pytest."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(autouse=True)
def _stop_handlers_given_back(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A command that used (a stand-in) Ray keeps its exit handlers for stop signals to the process's end
    (launcher/backends/ray_connect_stop.leave_ray_cluster): in pytest they are given back after each test, and
    config/ray_thread's record of Ray calls is reset."""
    monkeypatch.setattr(ray_thread, "_running", None)
    monkeypatch.setattr(ray_init, "_tried", False)
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {sig: signal.getsignal(sig) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in before.items():
            if handler is not None:
                signal.signal(sig, handler)
