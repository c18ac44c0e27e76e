"""Room for the logs while serving: a log directory whose file system fills up is said once, and again when it has
room again.

An instance whose log file cannot take a line serves on, but the line is gone: the traceback of its next crash, the
cause of a failed restart, everything `pdlaunch serve` would show of its last log lines. Nothing else said so.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

CHECK_EVERY_S = 10.0
LOW_BYTES = 64 * 1024 * 1024  # below this the logs of a busy deployment fill it within minutes
ROOM_AGAIN_BYTES = 2 * LOW_BYTES  # said as room again only above this: no line at every small change near LOW_BYTES
MIB = 1024 * 1024


def free_bytes(path: Path) -> int | None:
    """Bytes free to this user on `path`'s file system; None when it cannot be asked (the directory was removed)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


class LogSpaceWatch:
    """Call `check(now)` from the supervisor's tick; it returns what to say (nothing most of the time)."""

    def __init__(self, log_dir: Path, free: Callable[[Path], int | None] = free_bytes) -> None:
        self.log_dir = log_dir
        self._free = free
        self._due = 0.0
        self.low = False

    def check(self, now: float) -> list[str]:
        if now < self._due:
            return []
        self._due = now + CHECK_EVERY_S
        free = self._free(self.log_dir)
        if free is None:
            return []
        if not self.low and free < LOW_BYTES:
            self.low = True
            state = "is full" if free == 0 else f"has only {free / MIB:.1f} MiB free"
            return [f"the log directory {self.log_dir} {state}: the instances' and the proxy's logs lose every line "
                    "that does not fit (the cause of a crash or of a failed restart among them); free space on its "
                    "file system, or run the next deployment with --log-dir on a larger one"]
        if self.low and free >= ROOM_AGAIN_BYTES:
            self.low = False
            return [f"the log directory {self.log_dir} has room again ({free / MIB:.0f} MiB free); lines the logs "
                    "lost meanwhile are not in them"]
        return []
