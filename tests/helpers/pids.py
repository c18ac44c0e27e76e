"""Signals to processes the tests started outside a ChildProcess (daemons of a test cluster)."""

from __future__ import annotations

import os


def signal_pid(pid: int, sig: int) -> None:
    """Send `sig` to `pid`; a process already gone is fine."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
