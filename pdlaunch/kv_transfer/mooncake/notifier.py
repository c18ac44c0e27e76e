"""The threads Mooncake notifications leave from: in order per peer session, each session on its own.

A notification is a zero-length transfer whose send blocks on the network: a peer that does not answer holds it
for Mooncake's handshake timeout (measured with 0.3.13 on CPU: 61 s for a peer whose port accepts but never
answers; a host that is gone costs a connect timeout). One thread for every peer made each other peer's
notifications wait behind such a send (a decode's release to a healthy prefill, which then kept the blocks until
its lease; a prefill's push_failed, whose decode waited for its deadline). Each session with notifications waiting
has one thread, which ends when its queue is empty: a stuck peer delays only its own, and a peer still gets its
notifications in the order they were queued.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from pdlaunch.errors import KVTransferError
from pdlaunch.memory import platform

logger = logging.getLogger(__name__)

# How long shutdown waits for the sends under way (a stuck one cannot be interrupted); what is still queued
# then is dropped, as a notification to a peer that does not answer would be lost anyway.
SHUTDOWN_WAIT_SECONDS = 10.0


class SessionNotifier:
    """Runs `send` callables in order per session, sessions in parallel; threads bound to `device_index`."""

    def __init__(self, device_index: int, name: str = "pdlaunch-mooncake-notify") -> None:
        self.device_index = device_index
        self._name = name
        self._queues: dict[str, deque[Callable[[], None]]] = {}  # session -> sends not started yet
        self._threads: dict[str, threading.Thread] = {}  # session -> the thread draining its queue
        self._lock = threading.Lock()
        self._accepting = True  # False once shutdown began
        self._closed = False  # True once shutdown stopped waiting: the queues are dropped
        self._started = 0

    def submit(self, session: str, send: Callable[[], None]) -> None:
        """Queue `send` after the sends already queued for `session` (it must log its own failures)."""
        with self._lock:
            if not self._accepting:
                raise KVTransferError("the Mooncake agent is closed: no notification leaves any more")
            queue = self._queues.get(session)
            if queue is not None:
                queue.append(send)
                return
            self._queues[session] = deque([send])
            self._started += 1
            thread = threading.Thread(target=self._drain, args=(session,), daemon=True,
                                      name=f"{self._name}-{self._started}")
            self._threads[session] = thread
        thread.start()

    def _drain(self, session: str) -> None:
        platform.set_device(self.device_index)  # Mooncake's CUDA paths use the calling thread's device
        while True:
            with self._lock:
                queue = self._queues[session]
                if not queue or self._closed:
                    del self._queues[session]
                    del self._threads[session]
                    return
                send = queue.popleft()
            try:
                send()
            except Exception:  # the send logs its own failures: this is a bug, and the queue must go on
                logger.exception("a Mooncake notification to session %s raised", session)

    def shutdown(self) -> None:
        """Stop taking notifications; wait at most SHUTDOWN_WAIT_SECONDS for the queued ones to leave."""
        with self._lock:
            self._accepting = False
            threads = list(self._threads.values())
        deadline = time.monotonic() + SHUTDOWN_WAIT_SECONDS
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._closed = True  # a thread still sending stops after that send; its queue is dropped
            stuck = sorted(self._threads)
        if stuck:
            logger.warning("Mooncake notifications to session(s) %s not sent within %.0fs of shutdown (the peer "
                           "does not answer): dropped", ", ".join(stuck), SHUTDOWN_WAIT_SECONDS)
