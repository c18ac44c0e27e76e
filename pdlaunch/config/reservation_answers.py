"""Answers to launchers asking who holds a port (config/port_reservations.py): a refused launcher connects to the
reservation's name and reads the holder's pid from the connection (SO_PEERCRED, set at its connect). The holder
must take those connections off its name: unaccepted, each stayed queued, and once the backlog was full (the tenth
question) every later asker learned only that some launcher held the port. One daemon thread per process accepts
and closes them, on epoll: a name is given back by its listener's close at once, where select or poll would keep the
socket open until they return.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading


class Answerer:
    """The thread that takes askers' connections off the names this process holds (module doc)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # RLock: a PortReservations' __del__ may run in the thread, under the lock
        self._listeners: dict[int, socket.socket] = {}
        self._epoll: select.epoll | None = None

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
        with self._lock:
            fd = listener.fileno()
            if self._epoll is not None and self._listeners.get(fd) is listener:
                del self._listeners[fd]
                self._epoll.unregister(fd)
            listener.close()

    def _run(self, epoll: select.epoll) -> None:
        while True:
            ready = epoll.poll()
            with self._lock:  # a listener closed meanwhile is no longer in the map: nothing accepts on its fd
                for fd, _ in ready:
                    listener = self._listeners.get(fd)
                    while listener is not None:
                        try:
                            listener.accept()[0].close()  # the asker read our pid at its connect
                        except OSError:  # BlockingIOError: no asker left
                            break

    def forked(self) -> None:
        """In a forked child: no thread runs there; its own holds (if any) start one."""
        self._lock = threading.RLock()
        self._listeners = {}
        self._epoll = None


answerer = Answerer()
if sys.platform.startswith("linux"):
    os.register_at_fork(after_in_child=answerer.forked)
