"""Spawn targets standing in for a TP rank process that ends; they import nothing heavy, so they start fast."""

from __future__ import annotations

import os
import signal
import sys
from multiprocessing.connection import Connection


def say_and_exit(conn: Connection, message: bytes, code: int) -> None:
    """Send `message` (a pickled TP message) to rank 0, then exit with `code`, as a failing worker does."""
    conn.send_bytes(message)
    conn.close()
    sys.exit(code)


def killed_at_start(*_args: object) -> None:
    """In run_worker's place: a worker killed (e.g. by the OOM killer) before it did anything."""
    os.kill(os.getpid(), signal.SIGKILL)
