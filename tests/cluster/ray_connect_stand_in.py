"""Stand-ins for the tests of a stop signal while `--backend ray` connects (launcher/backends/ray_connect_stop.py):
ray.init and the cluster's node list, in which the stop arrives (and the head's address, which the launcher
reads between them), and os._exit made to raise so that the test sees
the exit code and the stack unwinds (the signal handlers are given back)."""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace
from typing import NoReturn

import pytest

from pdlaunch.config import ray_cluster

SIGNAL_WAIT_S = 30.0  # the stand-in waits this long for the signal to end it
INSIDE_INIT = "inside ray.init"  # the connect cut short: ray_cluster.connecting_to() still names the address
AFTER_INIT = "after ray.init"  # the connect completed; the stop comes while the cluster's nodes are listed


class Left(BaseException):
    """os._exit(code), raised instead (not an Exception: no `except Exception` on the way may swallow it)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _left(code: int) -> NoReturn:
    raise Left(code)


def stopped(how: str) -> NoReturn:
    """A stop signal arrives here: a real SIGINT (StopSignals' handler raises), or, for "SIGTERM", the SystemExit
    that ray.init's own SIGTERM handler (sys.exit(signum)) raises in place of ours."""
    if how == "SIGTERM":
        raise SystemExit(signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    deadline = time.monotonic() + SIGNAL_WAIT_S
    while time.monotonic() < deadline:  # the handler runs between these sleeps and ends the wait
        time.sleep(0.01)
    raise AssertionError(f"SIGINT did not end the wait within {SIGNAL_WAIT_S:.0f}s")


def stand_in_ray(monkeypatch: pytest.MonkeyPatch, how: str, when: str) -> list[str]:
    """ray.init and ray.nodes replaced so that the stop signal `how` arrives `when` (INSIDE_INIT or AFTER_INIT);
    os._exit raises Left. Returns the calls of ray.shutdown, as they are made."""
    import ray

    initialized: list[bool] = []
    shutdowns: list[str] = []

    def init(**kwargs: object) -> None:
        if when == INSIDE_INIT:
            stopped(how)
        initialized.append(True)

    monkeypatch.setattr(ray, "is_initialized", lambda: bool(initialized))
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="127.0.0.1:6379"))
    monkeypatch.setattr(ray, "nodes", lambda: stopped(how))
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append("shutdown"))
    monkeypatch.setattr(ray_cluster, "_connecting", None)  # a cut-short connect leaves it set: reset after the test
    monkeypatch.setattr(os, "_exit", _left)
    return shutdowns
