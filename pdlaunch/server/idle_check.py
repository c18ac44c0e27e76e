"""When the engine thread runs the KV block integrity check: once the engine has been idle a while, not often.

The check (kvcache/block_integrity.py) walks every block and rehashes every cached prefix node, holding the
interpreter lock: ~10 ms on an 8B instance with 56k blocks (py-spy on an H200 prefill). Run the moment the engine
went idle, as it was, it ran after nearly every request of a prefill serving a few a second, and a request that
arrived meanwhile waited for it before its first step. Now it waits until the engine has been idle IDLE_S (a
request arriving in that time finds the engine free) and runs at most once per EVERY_S; a request arriving during
a check still waits, but for one check per EVERY_S at most.
"""

from __future__ import annotations

IDLE_S = 0.2
EVERY_S = 5.0


class IdleCheck:
    """The check's schedule: `after_step` says whether it is due now, `ran` records that it ran, `due_in` how
    long the thread may wait for a command before the check would be due."""

    def __init__(self, idle_s: float = IDLE_S, every_s: float = EVERY_S) -> None:
        self._idle_s, self._every_s = idle_s, every_s
        self._pending = False  # the engine ran requests since the last check
        self._idle_since: float | None = None
        self._ran_at: float | None = None

    def added(self) -> None:
        """A request was added: a check is due after it, even if it ends within the step it was added for (the
        engine's idle time starts again after that step)."""
        self._pending, self._idle_since = True, None

    def after_step(self, busy: bool, now: float) -> bool:
        if busy:
            self._pending, self._idle_since = True, None
            return False
        if self._idle_since is None:
            self._idle_since = now
        return self._pending and self.due_in(now) == 0.0

    def due_in(self, now: float) -> float:
        """Seconds until the check is due (0: due now); infinity when nothing ran since the last one."""
        if not self._pending or self._idle_since is None:
            return float("inf")
        ready = self._idle_since + self._idle_s
        if self._ran_at is not None:
            ready = max(ready, self._ran_at + self._every_s)
        return max(0.0, ready - now)

    def ran(self, now: float) -> None:
        self._pending, self._ran_at = False, now
