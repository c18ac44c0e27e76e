"""Answers to launchers asking who holds a port (config/port_reservations.py): a refused launcher connects to the
reservation's name and reads the holder's pid from the connection (SO_PEERCRED, set at its connect). The holder
must take those connections off its name: unaccepted, each stayed queued, and once the backlog was full (the tenth
question) every later asker learned only that some launcher held the port. One daemon thread per process accepts
and closes them, on epoll: a name is given back by its listener's close at once, where select or poll would keep the
socket open until they return.

An accept that fails other than for want of askers (EMFILE: the process is out of file descriptors) leaves the
asker queued, so the same readiness comes back at once: the thread pauses, PAUSE_MIN_S doubling up to PAUSE_MAX_S,
and says so once. Askers need no accept to learn the pid; only a backlog full of them goes unanswered meanwhile.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import sys
import threading
import time

logger = logging.getLogger(__name__)

PAUSE_MIN_S = 0.05
PAUSE_MAX_S = 1.0  # below the 2 s an asker waits on a full backlog (port_reservations._ASK_TIMEOUT_S)


class Answerer:
    """The thread that takes askers' connections off the names this process holds (module doc)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # RLock: a PortReservations' __del__ may run in the thread, under the lock
        self._listeners: dict[int, socket.socket] = {}
        self._epoll: select.epoll | None = None
        self._warned = False

    def add(self, listener: socket.socket) -> None:
        with self._lock:
            if self._epoll is None:
                self._epoll = select.epoll()
                threading.Thread(target=self._run, args=(self._epoll,), name="pdlaunch-port-answers",
                                 daemon=True).start()
            listener.setblocking(False)
            self._listeners[listener.fileno()] = listener
            self._epoll.register(listener.fileno(), select.EPOLLIN)

    def close(self, listener: socket.socket) -> None:
        # At the interpreter's shutdown (a PortReservations' __del__) the daemon thread is frozen where it stands,
        # maybe holding the lock for good: waiting for it hung the exit. The close alone gives the name back (and
        # takes the fd out of the epoll set); the map's entry goes with the process.
        if not self._lock.acquire(blocking=not sys.is_finalizing()):
            listener.close()
            return
        try:
            fd = listener.fileno()
            if self._epoll is not None and self._listeners.get(fd) is listener:
                del self._listeners[fd]
                self._epoll.unregister(fd)
            listener.close()
        finally:
            self._lock.release()

    def _run(self, epoll: select.epoll) -> None:
        pause_s = 0.0
        while True:
            ready = epoll.poll()
            failure: OSError | None = None
            with self._lock:  # a listener closed meanwhile is no longer in the map: nothing accepts on its fd
                for fd, _ in ready:
                    failure = self._take_askers(self._listeners.get(fd)) or failure
            if failure is None:
                pause_s = 0.0
                continue
            self._say_failure(failure)
            pause_s = min(max(2 * pause_s, PAUSE_MIN_S), PAUSE_MAX_S)
            time.sleep(pause_s)  # out of the lock: a release goes on meanwhile

    @staticmethod
    def _take_askers(listener: socket.socket | None) -> OSError | None:
        """Accept and close every asker queued on `listener`; the error that stopped it, if not the queue's end."""
        while listener is not None:
            try:
                listener.accept()[0].close()  # the asker read our pid at its connect
            except BlockingIOError:  # no asker left
                return None
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:  # that asker gave up already: the next one
                    continue
                return exc
        return None

    def _say_failure(self, exc: OSError) -> None:
        if self._warned:
            return
        self._warned = True
        fix = " (raise the open-file limit: ulimit -n)" if exc.errno in (errno.EMFILE, errno.ENFILE) else ""
        logger.warning("cannot take other pdlaunch launchers' questions about this deployment's ports off the "
                       "queue: %s%s; retrying every %gs at most, and a launcher that asks meanwhile may be told "
                       "the holder does not answer", exc.strerror or exc, fix, PAUSE_MAX_S)

    def forked(self) -> None:
        """In a forked child: no thread runs there; its own holds (if any) start one."""
        self._lock = threading.RLock()
        self._listeners = {}
        self._epoll = None
        self._warned = False


answerer = Answerer()
if sys.platform.startswith("linux"):
    os.register_at_fork(after_in_child=answerer.forked)
