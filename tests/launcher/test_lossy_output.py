"""The launcher's output (launcher/output.py): a line the target refuses is dropped without an error, and once it
takes lines again the first one says since when lines are missing and why."""

from __future__ import annotations

import errno
import io
import os
import select
import signal
import threading
import time
from types import FrameType

from rich.console import Console

from pdlaunch.launcher.output import LossyOutput


class FillingDisk(io.StringIO):
    """A file whose disk is full while `full` is set."""

    full = False

    def write(self, text: str) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(text)


def test_lines_the_disk_refused_are_dropped_and_said_missing_once_it_takes_lines_again() -> None:
    target = FillingDisk()
    failed_at = time.mktime((2026, 11, 30, 9, 27, 1, 0, 0, -1))
    console = Console(file=LossyOutput(target, clock=lambda: failed_at).as_text_io(), soft_wrap=True)
    console.print("[pdlaunch] decode-0 is ready", highlight=False, markup=False)
    target.full = True
    console.print("[pdlaunch] decode-0 (pid 7) was killed by signal 9 (SIGKILL); restart 1 in 1.0s", highlight=False,
                  markup=False)
    console.print("[pdlaunch] decode-0: restart 1", highlight=False, markup=False)
    target.full = False
    console.print("[pdlaunch] decode-0 is ready again after restart 1", highlight=False, markup=False)
    assert target.getvalue().splitlines() == [
        "[pdlaunch] decode-0 is ready",
        "[pdlaunch] lines of this output since 09:27:01 are missing: it could not be written (No space left on "
        "device)",
        "[pdlaunch] decode-0 is ready again after restart 1",
    ]


def test_a_closed_pipe_is_no_error_either() -> None:
    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    output = LossyOutput(ClosedPipe())
    Console(file=output.as_text_io()).print("a line nobody reads")  # rich alone exits on EPIPE
    assert output.failing_since is not None


def test_a_line_from_a_signal_handler_while_a_write_blocks_is_dropped_not_raised() -> None:
    """The second Ctrl-C's line, printed by the handler while the main thread's print waits on a full pipe (rich writes,
    then flushes: both refuse the reentrant call). The handler acts only once the pipe is full, i.e. once the main
    thread's write blocks; until then it looks again every 50 ms."""
    read_end, write_end = os.pipe()
    target = open(write_end, "w")  # noqa: SIM115 (closed below, after the blocked write returns)
    console = Console(file=LossyOutput(target).as_text_io(), soft_wrap=True)
    release = threading.Event()  # set by the handler (the main thread never waits on it); else by the rescue bound
    drained: list[bytes] = []

    def drain() -> None:
        release.wait(60)  # a handler that never acted: the write is released anyway, and the asserts fail
        with open(read_end, "rb") as pipe:
            drained.append(pipe.read())

    reader = threading.Thread(target=drain)
    reader.start()

    def second_signal(signum: int, _: FrameType | None) -> None:
        if select.select([], [write_end], [], 0)[1]:  # room left in the pipe: the main thread's write is not blocked
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return
        console.print("second signal: stopping now", highlight=False)
        release.set()

    previous = signal.signal(signal.SIGALRM, second_signal)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        console.print("x" * (1 << 20), highlight=False)  # far more than a pipe holds: blocks until the handler
        console.print("stopped", highlight=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        release.set()
        target.close()
    reader.join(60)
    assert drained[0].startswith(b"x" * (1 << 20) + b"\n"), "the main thread's line was cut"
    tail = drained[0][(1 << 20) + 1:].decode()
    assert "second signal" not in tail and tail.endswith("stopped\n")
    assert tail.startswith("[pdlaunch] lines of this output since ")
    assert ("are missing: it could not be written (a line came from a signal handler while a write was under way)"
            in tail)
