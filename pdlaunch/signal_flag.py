"""A stop flag that a signal handler may set.

Python runs a signal handler in the main thread, between two bytecodes of whatever runs there. threading.Event's
set() takes the event's lock; when a handler ran while the main thread was inside that same event's wait() (after
the wait took the lock back, before it let go), set() waited for a lock its own thread held, and the process hung
for good: `pdlaunch serve` ignored SIGTERM, its launcher loop waiting on the event five times a second. SignalFlag's
set() only stores a bool; wait() looks at it every WAKE_S while it sleeps.
"""

from __future__ import annotations

import time

WAKE_S = 0.05  # the longest a wait goes on after the flag was set (a handler runs inside time.sleep, which resumes)


class SignalFlag:
    """set / is_set / wait(timeout) like threading.Event, without a lock: safe in a signal handler, in any thread."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """True once the flag is set, False when `timeout` seconds passed without it."""
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._set:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, WAKE_S))
        return True
