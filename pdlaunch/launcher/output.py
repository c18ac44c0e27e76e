"""The launcher's own output never stops a deployment: a line that cannot be written is lost, not the instances.

`nohup pdlaunch serve > serve.log` on a disk that fills up (often the disk of the log directory too), or a pipe
whose reader went away (`pdlaunch serve | tee serve.log`, tee killed): the next status line raised ENOSPC or
EPIPE out of the supervisor's tick, and serve stopped every instance though they served on fine (rich itself
exits on a broken pipe). Written through LossyOutput, such lines are dropped, and once the output takes lines
again the first one says since when lines are missing and why. So is a line a stop signal's handler writes (the second
Ctrl-C's "stopping now") while the main thread's own write is blocked on a slow reader: Python's buffered writer
refuses that reentrant call with a RuntimeError, which ended the stop in a traceback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO, TextIO, cast


class LossyOutput:
    """A text stream over `target` whose write and flush do not raise OSError. Terminal detection, encoding and
    fileno are the target's, so rich draws its live table on a terminal as before. The target is fixed here (rich's
    Live replaces sys.stdout with a proxy that prints through this very console)."""

    def __init__(self, target: TextIO, clock: Callable[[], float] = time.time) -> None:
        self._target = target
        self._clock = clock
        self.failing_since: float | None = None  # wall-clock time of the first write that failed, while failing
        self._reason = ""

    def write(self, text: str) -> int:
        if self.failing_since is not None:
            since = time.strftime("%H:%M:%S", time.localtime(self.failing_since))
            note = (f"[pdlaunch] lines of this output since {since} are missing: it could not be written "
                    f"({self._reason})\n")
            if not self._written(note):
                return len(text)
            self.failing_since = None
        self._written(text)
        return len(text)

    def _written(self, text: str) -> bool:
        """Write and flush `text`; False (and the failure noted) when the target refused it."""
        try:
            self._target.write(text)
            self._target.flush()
        except (OSError, RuntimeError) as exc:
            self._failed(exc)
            return False
        return True

    def flush(self) -> None:
        """What the target holds goes out; if it cannot, it stays in its buffer, and the next write says lines are
        missing if it fails again. Rich flushes after each print: a signal handler's print reaches here too."""
        try:
            self._target.flush()
        except OSError:
            pass
        except RuntimeError as exc:
            if not _reentrant(exc):
                raise

    def _failed(self, exc: OSError | RuntimeError) -> None:
        """Note why the output refused a line: ENOSPC, EPIPE (BrokenPipeError), EIO (a terminal that went away); or
        Python's buffered writer refusing a reentrant call, from a signal handler (a second Ctrl-C's line) while the
        write of its thread blocked. Another RuntimeError is a bug and is raised."""
        if isinstance(exc, RuntimeError):
            if not _reentrant(exc):
                raise exc
            reason = "a line came from a signal handler while a write was under way"
        else:
            reason = exc.strerror or type(exc).__name__
        if self.failing_since is None:
            self.failing_since = self._clock()
        self._reason = reason

    def isatty(self) -> bool:
        return self._target.isatty()

    def fileno(self) -> int:
        return self._target.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._target, "encoding", None) or "utf-8"

    def as_text_io(self) -> IO[str]:
        """This stream as the IO[str] rich's Console takes: of a file it calls only write, flush, isatty, fileno
        and encoding."""
        return cast(IO[str], self)


def _reentrant(exc: RuntimeError) -> bool:
    """Whether `exc` is Python's buffered writer refusing a call made while its own thread is inside it."""
    return "reentrant call" in str(exc)
