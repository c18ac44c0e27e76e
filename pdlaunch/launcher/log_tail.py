"""The end of a child's log, read within a bounded time: the launcher reads it on its main thread when a child dies (to
say why), and a log on a hung file system (an NFS server that stopped answering) blocks open() or read() for good,
which held the launcher there: no other restart, no stop. The read runs on a thread of its own, waited for up to
TAIL_TIMEOUT_S; one that has not returned by then is left to the kernel (a daemon thread), and no second read of that
file starts while it is stuck. The same bound holds any other small read of a log-dir file the launcher makes on its
main thread (`bounded_read`: a slurm node's device line, a log dir lock's owner)."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

TAIL_TIMEOUT_S = 5.0  # how long the launcher waits for a log's tail before it goes on without it
TAIL_BYTES = 64 * 1024  # the tail is read from this much of the log's end

_stuck: dict[Path, threading.Thread] = {}  # log -> its read that did not return in time, while it has not
_stuck_lock = threading.Lock()
T = TypeVar("T")


class LogUnreadable(Exception):
    """A log's tail was not read within its timeout (a hung file system)."""

    def __init__(self, path: Path, timeout: float, waited: bool = True) -> None:
        # waited: False when an earlier read of `path` was still stuck, so this one did not start (said at once)
        self.path, self.timeout, self.waited = path, timeout, waited
        super().__init__(f"its log {path} could not be read within {timeout:g}s (a hung file system? an NFS server "
                         "that does not answer)")


def read_tail(path: Path, lines: int, since: int = 0) -> list[str]:
    """The last `lines` lines of `path` (of its part from byte `since` on, at most TAIL_BYTES); blocks as the file
    system does."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(since, f.tell() - TAIL_BYTES))
        return [line.decode(errors="replace").rstrip() for line in deque(f, maxlen=lines)]


def log_tail(path: Path, lines: int, since: int = 0, timeout: float | None = None,
             read: Callable[[Path, int, int], list[str]] = read_tail) -> list[str]:
    """`read(path, lines, since)` (read_tail) on a thread of its own, waited for up to `timeout` seconds (None:
    TAIL_TIMEOUT_S): [] when the log cannot be read (OSError: gone, no permission); LogUnreadable when the read did
    not return in time, or an earlier read of `path` is still stuck (at once then)."""
    try:
        return bounded_read(path, lambda: read(path, lines, since), timeout)
    except OSError:
        return []


def bounded_read(path: Path, read: Callable[[], T], timeout: float | None = None) -> T:
    """`read()` (which reads `path`) on a thread of its own, waited for up to `timeout` seconds (None:
    TAIL_TIMEOUT_S); what it raised is raised here. LogUnreadable when it did not return in time, or an earlier read
    of `path` is still stuck (at once then, `waited` False)."""
    timeout = TAIL_TIMEOUT_S if timeout is None else timeout
    with _stuck_lock:
        stuck = _stuck.get(path)
        if stuck is not None and stuck.is_alive():
            raise LogUnreadable(path, timeout, waited=False)
        _stuck.pop(path, None)
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(read())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name=f"pdlaunch log read {path.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        with _stuck_lock:
            _stuck[path] = thread
        raise LogUnreadable(path, timeout)
    if error:
        raise error[0]
    return result[0]
