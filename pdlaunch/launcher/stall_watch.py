"""Which live processes are stalled: alive (no exit), but their /health does not answer in time.

A stopped (SIGSTOP), hung or swapped-out process still has its listening socket: the kernel accepts
connections into the backlog, so a connect succeeds and only the answer never comes (once clients
have filled the backlog, the connect itself times out). A probe that times out
(proxy.health_timeout_seconds) is that stall; a refused connection is a process that is gone or
restarting, which the supervisor learns from its exit instead. Probes run on a thread of their own,
so a stalled process never slows the supervisor's tick.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

PROBE_INTERVAL_S = 1.0


class StallWatch:
    """Probes the /health of every watched process once a second; `stalled_for(name)` says since when
    one has not answered (seconds), or None when its last probe got an answer (or none timed out)."""

    def __init__(self, urls: dict[str, str], timeout_s: float, headers: dict[str, str] | None = None,
                 interval_s: float = PROBE_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.urls = dict(urls)  # name -> its /health URL
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self._clock = clock
        self._http = httpx.Client(trust_env=False, headers=headers or {})
        self._watched: set[str] = set()
        self._since: dict[str, float] = {}  # name -> when its first unanswered probe was sent
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pdlaunch-stall-watch", daemon=True)

    def start(self) -> StallWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=self.timeout_s + self.interval_s + 1.0)
        self._http.close()

    def watch(self, name: str, on: bool) -> None:
        """Probe `name` (it is up and ready) or not (dead, restarting); either way its stall is forgotten
        when it stops being watched."""
        with self._lock:
            if on:
                self._watched.add(name)
            else:
                self._watched.discard(name)
                self._since.pop(name, None)

    def stalled_for(self, name: str) -> float | None:
        with self._lock:
            since = self._since.get(name)
        return None if since is None else self._clock() - since

    def probe(self, name: str) -> None:
        """One probe of `name` (the thread's loop; tests call it directly)."""
        sent = self._clock()
        try:
            self._http.get(self.urls[name], timeout=self.timeout_s)
            answered: bool | None = True
        except httpx.TimeoutException:  # no answer, or (its listen backlog full) not even a connect
            answered = False
        except httpx.HTTPError:
            answered = None  # refused or dropped: gone, not stalled (its exit tells the supervisor)
        with self._lock:
            if name not in self._watched:
                return
            if answered is False:
                self._since.setdefault(name, sent)
            else:
                self._since.pop(name, None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                names = sorted(self._watched)
            for name in names:
                if self._stop.is_set():
                    return
                self.probe(name)
            self._stop.wait(self.interval_s)
