"""A stand-in for a long first-use model fetch or conversion (`demo.ensure_demo_checkpoint`) that a stop signal
arrives during: the tests of `serve` (local and Ray backends) that a Ctrl-C or SIGTERM ends that work."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from pdlaunch.model import demo


def slow_fetch_interrupted(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[bool]:
    """Replace the demo fetch: its first call sends this process a SIGTERM, then works for `seconds` in steps the
    signal's handler can end; later calls fetch as before. The returned list gets True when a first call ran to its
    end (the signal did not end it)."""
    real = demo.ensure_demo_checkpoint
    finished: list[bool] = []

    def slow_fetch() -> Path:
        if not finished:
            os.kill(os.getpid(), signal.SIGTERM)
            end = time.monotonic() + seconds
            while time.monotonic() < end:  # the fetch's work, not a wait for a condition
                time.sleep(0.05)
            finished.append(True)
        return real()

    monkeypatch.setattr(demo, "ensure_demo_checkpoint", slow_fetch)
    return finished
