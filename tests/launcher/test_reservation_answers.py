"""The thread that answers launchers asking who holds a port (config/reservation_answers.py) when it cannot accept
their connections, and at the exit of a process that still holds ports."""

from __future__ import annotations

import errno
import logging
import socket
import subprocess
import sys
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


EXIT_HOLDING = """
import sys
from pdlaunch.config.port_reservations import PortReservations, reservation_holder
# In a namespace of its own: the answer thread's frame, frozen at shutdown, keeps it (and not __main__) alive.
blocking = {}
exec('''
import socket, threading
inside, never = threading.Event(), threading.Event()
real_accept = socket.socket.accept
def accept(sock):
    if sock.family == socket.AF_UNIX:
        inside.set()
        never.wait()  # the answer thread is here, holding the answerer's lock, when the process exits
    return real_accept(sock)
socket.socket.accept = accept
''', blocking)
held = PortReservations()  # never released: its __del__ gives the ports back at the interpreter's shutdown
assert held.reserve("127.0.0.1", int(sys.argv[1])) is None
assert reservation_holder("127.0.0.1", int(sys.argv[1])) is not None
assert blocking["inside"].wait(30), "the answer thread did not take the question"
print("exiting", flush=True)
"""


def test_a_process_that_exits_holding_ports_exits_while_the_answer_thread_holds_its_lock() -> None:
    """A PortReservations dropped at the interpreter's shutdown gives its names back in __del__, under the answer
    thread's lock; a daemon thread is frozen where it stands at shutdown, so one caught holding that lock (accepting
    an asker) hung the exit of a launcher that stopped without releasing (a failed start, an uncaught error)."""
    port = PortAllocator(HOST).free("held by the exiting process")
    try:
        done = subprocess.run([sys.executable, "-c", EXIT_HOLDING, str(port)], capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the process did not exit within 60s of its last line: {exc.stdout!r} {exc.stderr!r}")
    assert done.returncode == 0 and done.stdout == "exiting\n", (done.returncode, done.stdout, done.stderr)
    assert reservation_holder(HOST, port) is None  # the kernel took the names back with the process
