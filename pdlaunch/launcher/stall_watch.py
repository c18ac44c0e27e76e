"""Which live processes are stalled: alive (no exit), but their /health does not answer in time.

A stopped (SIGSTOP), hung or swapped-out process still has its listening socket: the kernel accepts
connections into the backlog, so a connect succeeds and only the answer never comes (once clients
have filled the backlog, the connect itself times out). A probe that times out
(proxy.health_timeout_seconds) is that stall; a refused connection is a process that is gone or
restarting, which the supervisor learns from its exit instead. Each watched process is probed by a thread of
its own, on its own schedule (a probe, then PROBE_INTERVAL_S): a stalled process never slows the supervisor's tick,
nor the probes of the others (probed one after another, a live process's next probe waited for every stalled one's
timeout, and one slow answer read as a stall past check-config's floor, config/rules/roles.py).

Each probe's outcome is also kept as a status row's state (`health`): node 0 has no process of the
instances other nodes run, so their rows follow what their /health says, once it is checked to be theirs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

from pdlaunch.config.launcher_config import STALL_PROBE_INTERVAL_S

PROBE_INTERVAL_S = STALL_PROBE_INTERVAL_S
NOT_ITSELF = "not this instance"  # the state of a row whose address another server answers


def health_state(response: httpx.Response, is_itself: Callable[[httpx.Response], bool] | None = None) -> str:
    """A /health answer as a status row's state: "ready" (200), or "not this instance" for a 200 that
    `is_itself` says another server gave; else the state the instance names in its body ("loading",
    "failed"), else "unhealthy (HTTP N)"."""
    if response.status_code == 200:
        return "ready" if is_itself is None or is_itself(response) else NOT_ITSELF
    try:
        said = response.json().get("status")
    except (ValueError, AttributeError):  # not JSON, or not an object
        said = None
    return said if isinstance(said, str) and said.isidentifier() else f"unhealthy (HTTP {response.status_code})"


class StallWatch:
    """Probes the /health of every watched process once a second, each on a thread of its own (at most one per
    watched name; all joined at stop); `stalled_for(name)` says how long ago
    (seconds) the first of its probes that still go unanswered timed out, or None when its last probe got an
    answer (or none timed out).
    `is_itself`: name -> whether a 200 answer is that process's own (`health_state`)."""

    def __init__(self, urls: dict[str, str], timeout_s: float, headers: dict[str, str] | None = None,
                 interval_s: float = PROBE_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 is_itself: dict[str, Callable[[httpx.Response], bool]] | None = None) -> None:
        self.urls = dict(urls)  # name -> its /health URL
        self.is_itself = dict(is_itself or {})
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self._clock = clock
        self._http = httpx.Client(trust_env=False, headers=headers or {})
        self._watched: set[str] = set()
        # name -> when its first unanswered probe timed out. Not when it was sent: a stall's age then began
        # health_timeout old, and one answer a moment late (a GC pause, a loaded CI box) read as a stall of
        # timeout + interval, long enough for a stall_restart_seconds near the timeout to kill a live instance.
        self._since: dict[str, float] = {}
        self._health: dict[str, str] = {}  # name -> its last probe's outcome as a row state
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = False
        # name -> the thread probing it: one per watched name, which ends once its name is no longer watched.
        self._threads: dict[str, threading.Thread] = {}

    def start(self) -> StallWatch:
        with self._lock:
            self._started = True
            for name in self._watched:
                self._prober(name)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            threads = list(self._threads.values())
        until = time.monotonic() + self.timeout_s + self.interval_s + 1.0  # a probe in flight ends by its timeout
        for thread in threads:
            thread.join(timeout=max(0.0, until - time.monotonic()))
        self._http.close()

    def watch(self, name: str, on: bool) -> None:
        """Probe `name` (it is up and ready) or not (dead, restarting); either way its stall is forgotten
        when it stops being watched."""
        with self._lock:
            if on:
                self._watched.add(name)
                if self._started:
                    self._prober(name)
            else:
                self._watched.discard(name)
                self._since.pop(name, None)
                self._health.pop(name, None)

    def stalled_for(self, name: str) -> float | None:
        with self._lock:
            since = self._since.get(name)
        return None if since is None else self._clock() - since

    def health(self, name: str) -> str | None:
        """What the last probe of `name` said, as a status row's state: "ready", "not this instance", the state
        its /health names ("loading", "failed"), "stalled" (no answer in time) or "down" (refused: gone or
        restarting); None before the first probe."""
        with self._lock:
            return self._health.get(name)

    def probe(self, name: str) -> None:
        """One probe of `name` (the thread's loop; tests call it directly)."""
        try:
            health = health_state(self._http.get(self.urls[name], timeout=self.timeout_s), self.is_itself.get(name))
            answered: bool | None = True
        except httpx.TimeoutException:  # no answer, or (its listen backlog full) not even a connect
            answered, health = False, "stalled"
        except httpx.HTTPError:
            answered, health = None, "down"  # refused or dropped: gone, not stalled (its exit tells the supervisor)
        timed_out = self._clock()  # when answered is False: the stall is counted from here
        with self._lock:
            if name not in self._watched:
                return
            self._health[name] = health
            if answered is False:
                self._since.setdefault(name, timed_out)
            else:
                self._since.pop(name, None)

    def _prober(self, name: str) -> None:
        """Under the lock: start the thread that probes `name`, unless one runs (it goes on while `name` is watched)."""
        if self._stop.is_set() or (name in self._threads and self._threads[name].is_alive()):
            return
        thread = threading.Thread(target=self._loop, args=(name,), name=f"pdlaunch-stall-watch-{name}", daemon=True)
        self._threads[name] = thread
        thread.start()

    def _loop(self, name: str) -> None:
        while not self._stop.is_set():
            with self._lock:
                if name not in self._watched:  # its thread ends; watching it again starts another
                    if self._threads.get(name) is threading.current_thread():
                        del self._threads[name]
                    return
            self.probe(name)
            self._stop.wait(self.interval_s)
