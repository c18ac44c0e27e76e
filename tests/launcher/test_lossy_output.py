"""The launcher's output (launcher/output.py): a line the target refuses is dropped without an error, and once it
takes lines again the first one says since when lines are missing and why."""

from __future__ import annotations

import errno
import io
import time

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
