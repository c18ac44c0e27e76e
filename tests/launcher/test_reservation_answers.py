"""The thread that answers launchers asking who holds a port (config/reservation_answers.py) when it cannot accept
their connections, and at the exit of a process that still holds ports."""

from __future__ import annotations

import errno
import logging
import socket
import time
from typing import Any

import pytest

from pdlaunch.config import reservation_answers
from pdlaunch.config.port_reservations import PortReservations, reservation_holder
from pdlaunch.launcher.ports import PortAllocator
from tests.serving.helpers import wait_for

HOST = "127.0.0.1"


def test_out_of_file_descriptors_the_answer_thread_backs_off_and_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A holder out of file descriptors (EMFILE) cannot accept an asker's connection, which stays queued: the same
    readiness came back at once and the thread retried accept at full CPU for as long as the process was out of
    descriptors. It pauses (a bounded back-off), says so once, and takes the askers off once it can again."""
    port = PortAllocator(HOST).free("held here")
    mine = PortReservations()
    failing = {"on": True}
    failed: list[float] = []
    accepted: list[float] = []
    real_accept = socket.socket.accept

    def accept(sock: socket.socket) -> Any:
        if sock.family == socket.AF_UNIX and b"pdlaunch-port:" in sock.getsockname():
            if failing["on"]:
                failed.append(time.monotonic())
                raise OSError(errno.EMFILE, "Too many open files")
            accepted.append(time.monotonic())
        return real_accept(sock)

    monkeypatch.setattr(socket.socket, "accept", accept)
    caplog.set_level(logging.WARNING, logger=reservation_answers.__name__)
    try:
        assert mine.reserve(HOST, port) is None
        assert (reservation_holder(HOST, port) or "").startswith("pid ")  # its pid is read at connect: still named
        wait_for(lambda: failed, "the answer thread to try to accept the asker", 30)
        window = [time.monotonic()]
        for _ in range(50):  # the test's own turns while the thread fails: a spinning thread fails thousands of times
            time.sleep(0.01)
            window.append(time.monotonic())
        during = [t for t in failed if window[0] <= t <= window[-1]]
        assert len(during) <= 10, f"accept failed {len(during)} times in {window[-1] - window[0]:.2f}s: spinning"
        said = [r.getMessage() for r in caplog.records if "cannot take" in r.getMessage()]
        assert len(said) == 1, said
        assert "Too many open files" in said[0] and "ulimit -n" in said[0], said[0]
        failing["on"] = False
        wait_for(lambda: accepted, "the answer thread to accept the asker once it can again", 30)
        assert len([r for r in caplog.records if "cannot take" in r.getMessage()]) == 1
    finally:
        mine.release()
