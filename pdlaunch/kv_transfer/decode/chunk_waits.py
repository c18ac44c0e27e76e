"""Staged pushes: each chunk's WRITE is awaited in its loader thread until the prefill's push_done/push_failed
notification names the chunk (its own nonce); a chunk given up while its WRITE may still land keeps its
staging slots until that notification, or the end of its load's drain, says it ended.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

from pdlaunch.kv_transfer.notifications import PushDone, PushFailed


class ChunkWaits:
    """Staged pushes wait in their loader thread for each chunk's notification, keyed by its nonce. A chunk
    stays open after its loader stopped waiting (timeout, abort): its WRITE may still land, and only its
    notification (or the drain's end: `forget`) says it will not."""

    def __init__(self) -> None:
        # chunk nonce -> (woken when it ended, its error, called first when it ended, the load's nonce)
        self._events: dict[str, tuple[threading.Event, list[str], Callable[[], None], str]] = {}
        self._late: dict[str, Callable[[], None]] = {}  # chunk nonce -> frees its slots once it ended (give_up)
        self._lock = threading.Lock()

    def open(self, owner: str, on_end: Callable[[], None]) -> tuple[str, threading.Event, list[str]]:
        nonce = uuid.uuid4().hex[:16]
        event, errors = threading.Event(), list[str]()
        with self._lock:
            self._events[nonce] = (event, errors, on_end, owner)
        return nonce, event, errors

    def give_up(self, nonce: str, release: Callable[[], None]) -> bool:
        """The loader stopped waiting for chunk `nonce` while its WRITE may still land: `release` is called
        when the chunk ends (its notification, or `forget` at the drain's end). False when it already
        ended: the caller releases now."""
        with self._lock:
            if nonce not in self._events:
                return False
            self._late[nonce] = release
            return True

    def forget(self, owner: str) -> None:
        """The load whose nonce is `owner` is gone (no WRITE of it can land any more): a notification of
        its chunks is ignored from now on, and the slots of chunks given up are freed."""
        with self._lock:
            nonces = [n for n, chunk in self._events.items() if chunk[3] == owner]
            for nonce in nonces:
                del self._events[nonce]
            late = [release for n in nonces if (release := self._late.pop(n, None)) is not None]
        for release in late:
            release()

    def on_notif(self, notif: PushDone | PushFailed) -> bool:
        """True when the notification ended a chunk (its loader thread wakes up)."""
        with self._lock:
            chunk = self._events.pop(notif.nonce, None)
            late = self._late.pop(notif.nonce, None)
        if chunk is None:
            return False
        if isinstance(notif, PushFailed):
            chunk[1].append(f"the prefill side could not push: {notif.error}")
        chunk[2]()  # before waking the loader, which may send the next chunk
        chunk[0].set()
        if late is not None:
            late()
        return True
