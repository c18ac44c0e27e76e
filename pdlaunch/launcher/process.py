"""One supervised child process: its own process group, its own log file, always reaped.

Each child leads a new session (process group), so a terminal's Ctrl-C reaches only the launcher,
which then stops the children in order; signalling the group also reaches TP worker processes.
A child can also be told to expect a signal when the launcher dies (`parent_death_signal`): the SLURM
backend's srun steps, whose nodes otherwise serve on after a SIGKILLed launcher, and the TP ranks a node
runs for instances whose rank 0 is on another node.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from types import FrameType
from typing import IO

from pdlaunch.config.rules.host import make_log_dir, os_reason
from pdlaunch.errors import PdlaunchError, exit_text
from pdlaunch.launcher.log_tail import LogUnreadable, log_tail

HURRY_POLL_S = 0.1  # how often a wait for a child to exit looks whether it should stop waiting
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Who else sends a SIGKILL: what an operator checks first
OUTSIDE_SIGKILL = ("a SIGKILL pdlaunch did not send: most often the kernel's OOM killer (`dmesg | grep -i oom` or "
                   "`journalctl -k` names the process; give it more memory, or run fewer or smaller instances on this "
                   "machine), else someone's `kill -9`")
EXIT_WORD = " pdlaunch.server: exiting: "  # an instance's last log line when it ends on an error (server/__main__.py)
RESTART_MARK = "===== pdlaunch: "  # start(note=...) writes it before a restart's lines


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP that arrive inside the block reach their handlers when it ends. A
    launcher whose handler raises KeyboardInterrupt (Ctrl-C; `bench compare` turns SIGTERM into one)
    must not have it land between fork and Popen's return, or between Popen and the child's
    registration: that child would run on, known to no one, after the launcher stopped the others
    (seen with SIGTERM during `bench compare`'s start). Python runs handlers on the main thread only,
    so elsewhere nothing is deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, _: FrameType | None) -> None:
        pending.append(signum)

    previous = {int(sig): signal.signal(sig, hold) for sig in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in pending:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:  # its default action (end this process), now it is unblocked
                os.kill(os.getpid(), signum)


@cache
def _prctl() -> Callable[..., int]:
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def parent_death_hook(sig: signal.Signals) -> Callable[[], None] | None:
    """What a child runs between fork and exec so that the kernel sends it `sig` when this process dies
    (prctl(PR_SET_PDEATHSIG)); None off Linux, which has no such call: there the child outlives a
    SIGKILLed launcher. The setting survives exec (not that of a set-user-ID program). The hook only calls
    prctl and getppid (after fork, in a process that may have had other threads, nothing that takes a
    lock); prctl is looked up here, before the fork."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, signum, parent = _prctl(), int(sig), os.getpid()

    def set_parent_death_signal() -> None:
        if prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent:  # it died between the fork and prctl: no signal will come, end here
            os._exit(1)

    return set_parent_death_signal


class ChildProcess:
    """`parent_death_signal`: the signal the child gets when the launcher dies, even by SIGKILL (Linux only;
    see parent_death_hook). The kernel sends it when the *thread* that called start() ends, not the
    process: start such a child only from a thread that outlives it (run_slurm starts its steps on the
    thread that waits for them to end; serve its TP ranks of other nodes' instances on its main thread).
    Instances and the proxy do without: they watch --parent-pid themselves.

    `tmp_dir_flag`: every start gets a new, empty directory of its own (in TMPDIR), named to the process by this flag,
    and the launcher removes it once the process is reaped and its group killed (`signal_group`): files there that the
    process removes only on a clean exit (the proxy's metrics files and load board, proxy/workers.py) do not stay
    behind a SIGKILL, nor reach the next start."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 parent_death_signal: signal.Signals | None = None, unset_env: tuple[str, ...] = (),
                 tmp_dir_flag: str | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env or {}
        self.unset_env = unset_env  # variables of this process's environment the child must not inherit
        self.parent_death_signal = parent_death_signal
        self.tmp_dir_flag = tmp_dir_flag
        self.tmp_dir: Path | None = None  # the running (or not yet reaped) process's, with tmp_dir_flag
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._killed = False  # the launcher sent the running process SIGKILL (since its last start)
        # Its reaped leader's group was SIGKILLed: no signal goes to that group id again, which another process may
        # hold by now (a restart comes 1-30 s later; a stop, any time later).
        self._group_ended = False
        self._run_start = 0  # the log's size when the last (re)start's own lines began (after its restart mark)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def start(self, note: str | None = None) -> None:
        """Start the process. With `note` (a restart), the log is appended to, after a line saying so."""
        self.close_log()
        self._end_group()  # the last run's, reaped: what is left of its group, and its directory
        self._killed = False
        try:
            make_log_dir(self.log_path.parent)
            # O_NOFOLLOW: a symlink planted in log_dir does not get its target truncated (or appended to)
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if note else os.O_TRUNC)
            fd = os.open(self.log_path, flags, 0o666)
            # unbuffered: nothing of ours is left to flush (and fail) at close; the child writes to the fd anyway
            self._log = os.fdopen(fd, "ab" if note else "wb", buffering=0)
        except OSError as exc:
            self.close_log()
            raise PdlaunchError(f"cannot write {self.name}'s log {str(self.log_path)!r}: {os_reason(exc)}",
                                field="log_dir", hint="pass --log-dir DIR (or set log_dir) to a directory you "
                                "can write, or remove what is in the way") from None
        if note:
            try:
                self._log.write(f"\n{RESTART_MARK}{note} =====\n".encode())
            except OSError:
                pass  # a full disk: the restart goes on without its mark (serve says the log directory is full)
        # Where this run's lines begin: exit_reason reads from here, not from the mark, which a full disk leaves out
        try:
            self._run_start = self._log.seek(0, os.SEEK_END)
        except OSError:  # a log that cannot seek (a FIFO): its whole tail is read
            self._run_start = 0
        env = {**{k: v for k, v in os.environ.items() if k not in self.unset_env}, "PYTHONUNBUFFERED": "1", **self.env}
        hook = parent_death_hook(self.parent_death_signal) if self.parent_death_signal is not None else None
        argv = self.argv
        if self.tmp_dir_flag is not None:
            try:
                self.tmp_dir = Path(tempfile.mkdtemp(prefix=f"pdlaunch-{self.name}-"))
            except OSError as exc:  # TMPDIR full (space or inodes), read-only or gone
                self.close_log()
                raise PdlaunchError(
                    f"cannot start {self.name}: cannot make its temporary directory in "
                    f"{tempfile.gettempdir()!r}: {exc.strerror or exc}", field="TMPDIR",
                    hint="free space (and inodes: df -i) there, or set TMPDIR to a writable directory") from None
            argv = [*argv, self.tmp_dir_flag, str(self.tmp_dir)]
        with signals_deferred():  # a child exists only once self.popen holds it
            try:
                self.popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True, preexec_fn=hook,
                )
                self._group_ended = False  # a new group (a start that failed leaves the old one's ended)
            except OSError as exc:
                self.close_log()
                self._remove_tmp_dir()
                raise PdlaunchError(f"cannot start {self.name} ({self.argv[0]}): {exc.strerror or exc}") from None

    def describe_exit(self) -> str:
        """How the process ended, in words ("was killed by signal 9 (SIGKILL)", "exited with code 1")."""
        return exit_text(self.poll())

    def outside_kill(self) -> str | None:
        """For a process that a SIGKILL the launcher did not send ended: who else sends one, and where to look."""
        return OUTSIDE_SIGKILL if self.poll() == -signal.SIGKILL and not self._killed else None

    def poll(self) -> int | None:
        """Exit code once the process ended (it is reaped then), else None."""
        return self.popen.poll() if self.popen is not None else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the child's whole process group (gone already: nothing to do). A SIGKILL once the leader is
        reaped ends the group for good (`_end_group`)."""
        if self.popen is None or self._group_ended:
            return
        if sig == signal.SIGKILL and self.popen.poll() is not None:
            self._end_group()
            return
        if sig == signal.SIGKILL:
            self._killed = True  # its death is the launcher's doing, not the OOM killer's
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _end_group(self) -> None:
        """Once the leader is reaped: SIGKILL what is left of its group (TP workers, proxy workers; they keep its id
        in use until they are gone), once, and remove the run's directory (`tmp_dir_flag`). Later signals to the
        group are dropped: its id may be another process's by then."""
        if self.popen is None or self.popen.poll() is None or self._group_ended:
            return
        self._group_ended = True
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._remove_tmp_dir()

    def _remove_tmp_dir(self) -> None:
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None

    def wait(self, timeout: float, hurry: Callable[[], bool] | None = None) -> bool:
        """True when the process ended within `timeout` seconds (and is reaped); False at once when
        `hurry()` turns true meanwhile (a second Ctrl-C)."""
        if self.popen is None:
            return True
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                self.popen.wait(timeout=max(0.0, min(HURRY_POLL_S, deadline - time.monotonic())))
                return True
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline or (hurry is not None and hurry()):
                    return False

    def stop(self, term_timeout: float, hurry: Callable[[], bool] | None = None) -> None:
        """SIGTERM, up to `term_timeout` s to exit (less if `hurry()` turns true), then SIGKILL; the
        group's stragglers are killed too."""
        if self.popen is None:
            return
        if self.running:
            self.signal_group(signal.SIGTERM)
            if not self.wait(term_timeout, hurry):
                self.signal_group(signal.SIGKILL)
                self.wait(10.0)
        self.signal_group(signal.SIGKILL)  # workers the leader left behind
        self.close_log()

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def exit_reason(self) -> str | None:
        """Why the ended process said it ended: its last `exiting: REASON` log line since its last (re)start (the
        log's lines past that start's offset: a full disk leaves out the restart's mark and the run's own lines, and
        the line before them was the run before's). A log not read within TAIL_TIMEOUT_S (a hung file system): that,
        naming the file."""
        if self.poll() in (None, 0):
            return None
        try:
            lines = self.tail(40, since=self._run_start)
        except LogUnreadable as exc:
            return str(exc)
        for line in reversed(lines):
            if EXIT_WORD in line:
                return line.split(EXIT_WORD, 1)[1].strip() or None
        return None

    def tail(self, lines: int = 20, since: int = 0) -> list[str]:
        """The last `lines` lines of the child's log (of its part from byte `since` on); [] when it cannot be read;
        LogUnreadable when it was not read within TAIL_TIMEOUT_S (a hung file system: log_tail.py)."""
        return log_tail(self.log_path, lines, since)


def stop_all(children: list[ChildProcess], term_timeout: float, hurry: Callable[[], bool] | None = None) -> None:
    """SIGTERM all at once, wait for all up to `term_timeout` together (less if `hurry()` turns true),
    then SIGKILL what is left. A child seen ended meanwhile (or before) is reaped at once: what is left of its group
    (a TP worker holding its GPU memory) is SIGKILLed then, not after the wait for the others."""
    for child in children:
        if child.running:
            child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + term_timeout
    waiting = list(children)
    while True:
        for child in [c for c in waiting if not c.running]:
            child.signal_group(signal.SIGKILL)  # reaped: its group's rest ends now (once: `_end_group`)
            waiting.remove(child)
        left = deadline - time.monotonic()
        if not waiting or left <= 0 or (hurry is not None and hurry()):
            break
        waiting[0].wait(min(HURRY_POLL_S, left))
    for child in children:
        child.stop(0.0)
