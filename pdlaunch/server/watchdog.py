"""Children of the launcher stop on their own when the launcher vanishes (e.g. it was SIGKILLed)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("pdlaunch")

POLL_S = 1.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def watch_parent(parent_pid: int, on_gone: Callable[[], None]) -> threading.Thread:
    """Call `on_gone` once when `parent_pid` no longer is this process's parent (polled every second)."""

    def run() -> None:
        stop = threading.Event()
        while not stop.wait(POLL_S):
            if os.getppid() != parent_pid or not _alive(parent_pid):
                log.error("launcher (pid %d) is gone; shutting down", parent_pid)
                on_gone()
                return

    thread = threading.Thread(target=run, name="parent-watchdog", daemon=True)
    thread.start()
    return thread
