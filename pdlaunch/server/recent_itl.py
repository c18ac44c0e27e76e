"""The mean time between the tokens an instance streamed over the last second: how long its running streams
wait per token now. /health reports it (`itl_ms`), so a proxy with proxy.disaggregate_max_itl_ms keeps
prompt work off a decode whose streams have no TPOT headroom (proxy/disaggregate.py)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 1.0


class RecentItl:
    """Token gaps added by the engine thread, read by the HTTP thread (a lock between them)."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._gaps: deque[tuple[float, float, int]] = deque()  # (when, seconds of gaps, tokens)
        self._seconds = 0.0
        self._tokens = 0
        self._lock = threading.Lock()

    def add(self, now: float, seconds: float, tokens: int) -> None:
        """`tokens` tokens streamed at `now`, each `seconds / tokens` after its stream's previous one."""
        with self._lock:
            self._gaps.append((now, seconds, tokens))
            self._seconds += seconds
            self._tokens += tokens
            self._prune(now)

    def ms(self) -> float:
        """Mean milliseconds between tokens over the window; 0.0 when nothing streamed in it (idle)."""
        with self._lock:
            self._prune(self._clock())
            return 1000.0 * self._seconds / self._tokens if self._tokens else 0.0

    def _prune(self, now: float) -> None:
        while self._gaps and self._gaps[0][0] < now - self.window_s:
            _, seconds, tokens = self._gaps.popleft()
            self._seconds -= seconds
            self._tokens -= tokens
        if not self._gaps:
            self._seconds, self._tokens = 0.0, 0  # no float drift left over from the sums
