"""Stand-ins for the tests of a stop signal while `--backend ray` connects (launcher/backends/ray_connect_stop.py):
ray.init and the cluster's node list, in which the stop arrives (and the head's address, which the launcher
reads between them), and os._exit made to raise so that the test sees the exit code and the stack unwinds (the
signal handlers are given back).

ray.init and ray.nodes run in a helper thread (config/ray_thread.py): the stand-in ray.init sends the signal to
this process and then goes on waiting, as a real one goes on connecting; it records whether an exception went
through it, which must never happen (config/ray_init.py: one raised inside a real ray.init by a signal's handler can
hang the process for good)."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import NoReturn

import pytest

from pdlaunch.config import ray_init, ray_thread

SIGNAL_WAIT_S = 30.0  # the stand-in waits this long for the signal to end the process
INSIDE_INIT = "inside ray.init"  # the connect cut short: ray_thread.cut_short() still names it
AFTER_INIT = "after ray.init"  # the connect completed; the stop comes while the cluster's nodes are listed (cut short)


class Left(BaseException):
    """os._exit(code), raised instead (not an Exception: no `except Exception` on the way may swallow it)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class RayCalls:
    """What the stand-in Ray saw: ray.shutdown's calls, as they were made, and the exceptions that went through
    ray.init (type names)."""

    shutdowns: list[str] = field(default_factory=list)
    raised_in_init: list[str] = field(default_factory=list)
    left: threading.Event = field(default_factory=threading.Event)  # os._exit was called

    def leave(self, code: int) -> NoReturn:
        self.left.set()
        raise Left(code)


def _signal_and_wait(how: str, calls: RayCalls) -> None:
    """Send the stop signal `how` to this process, then wait until the process "leaves" (os._exit). In the main
    thread the signal's handler raises inside this wait; in ray.init's thread it must not."""
    os.kill(os.getpid(), signal.Signals[how])
    deadline = time.monotonic() + SIGNAL_WAIT_S
    while not calls.left.is_set():
        assert time.monotonic() < deadline, f"{how} did not end the process within {SIGNAL_WAIT_S:.0f}s"
        time.sleep(0.01)


def stand_in_ray(monkeypatch: pytest.MonkeyPatch, how: str, when: str) -> RayCalls:
    """ray.init and ray.nodes replaced so that the stop signal `how` ("SIGINT", "SIGTERM") arrives `when`
    (INSIDE_INIT or AFTER_INIT); os._exit raises Left."""
    import ray

    initialized: list[bool] = []
    calls = RayCalls()

    def init(**kwargs: object) -> None:
        if when == INSIDE_INIT:
            try:
                _signal_and_wait(how, calls)
            except BaseException as exc:
                calls.raised_in_init.append(type(exc).__name__)
                raise
            return  # the process left meanwhile: this connect is abandoned, never completed
        initialized.append(True)

    monkeypatch.setattr(ray, "is_initialized", lambda: bool(initialized))
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="127.0.0.1:6379"))
    monkeypatch.setattr(ray, "nodes", lambda: _signal_and_wait(how, calls))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.shutdowns.append("shutdown"))
    monkeypatch.setattr(ray_thread, "_running", None)  # a cut-short Ray call leaves it set: reset after the test
    monkeypatch.setattr(ray_init, "_tried", False)
    monkeypatch.setattr(os, "_exit", calls.leave)
    return calls
