"""Room for the logs while serving: a log directory whose file system fills up is said once, and again when it has
room again.

An instance whose log file cannot take a line serves on, but the line is gone: the traceback of its next crash, the
cause of a failed restart, everything `pdlaunch serve` would show of its last log lines. Nothing else said so.

The question (statvfs) is asked on a thread of its own: on a hung network mount it does not return, and asked on the
supervisor's tick it held supervision (restarts, stall kills, the status rows) for as long as the mount hung. One
question at a time; one unanswered for ANSWER_TIMEOUT_S is said once, and again when it answers.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

CHECK_EVERY_S = 10.0
ANSWER_TIMEOUT_S = 2.0  # a local or healthy network file system answers in milliseconds
QUICK_S = 0.25  # waited on the tick for the usual quick answer, so that it is judged at the tick that asked
LOW_BYTES = 64 * 1024 * 1024  # below this the logs of a busy deployment fill it within minutes
ROOM_AGAIN_BYTES = 2 * LOW_BYTES  # said as room again only above this: no line at every small change near LOW_BYTES
MIB = 1024 * 1024


def free_bytes(path: Path) -> int | None:
    """Bytes free to this user on `path`'s file system; None when it cannot be asked (the directory was removed)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


class _Question:
    """One free-space question, asked on a daemon thread (a hung mount keeps it, not the supervisor)."""

    def __init__(self, free: Callable[[Path], int | None], log_dir: Path, asked_at: float) -> None:
        self.asked_at = asked_at
        self.answered = threading.Event()
        self.free: int | None = None

        def ask() -> None:
            try:
                self.free = free(log_dir)
            finally:
                self.answered.set()

        threading.Thread(target=ask, name="pdlaunch-log-space", daemon=True).start()


class LogSpaceWatch:
    """Call `check(now)` from the supervisor's tick; it returns what to say (nothing most of the time) and never
    waits on the file system for more than QUICK_S."""

    def __init__(self, log_dir: Path, free: Callable[[Path], int | None] = free_bytes) -> None:
        self.log_dir = log_dir
        self._free = free
        self._due = 0.0
        self._question: _Question | None = None
        self.low = False
        self.silent = False  # said that the directory does not answer

    def check(self, now: float) -> list[str]:
        if self._question is None:
            if now < self._due:
                return []
            self._due = now + CHECK_EVERY_S
            self._question = _Question(self._free, self.log_dir, now)
            self._question.answered.wait(QUICK_S)
        question = self._question
        if not question.answered.is_set():
            if self.silent or now - question.asked_at < ANSWER_TIMEOUT_S:
                return []
            self.silent = True
            return [f"the log directory {self.log_dir} does not answer: asking its file system for free space has "
                    f"not returned within {ANSWER_TIMEOUT_S:g}s (a hung network mount?); its free space is not "
                    "watched until it answers, and the instances and the proxy may hang writing their logs there"]
        self._question = None
        said = []
        if self.silent:
            self.silent = False
            said.append(f"the log directory {self.log_dir} answers again")
        return said + self._judge(question.free)

    def _judge(self, free: int | None) -> list[str]:
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
