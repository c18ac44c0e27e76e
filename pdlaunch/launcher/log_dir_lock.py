"""One live deployment per log directory: a run holds an exclusive lock on `<log_dir>/.pdlaunch.lock`
while its processes run, and a second run (a `pdlaunch smoke` beside a `pdlaunch serve`) sees it
before it writes anything there: it would truncate the live instance logs and overwrite the live
`deployment.json` (the 0600 file with the deployment secret).

The lock is a `flock` on an open file, so the kernel drops it when the holder dies: a killed run
leaves no stale lock behind. The file also says who holds it (pid, command, proxy URL) so that the
refusal can name the live deployment.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

from pdlaunch.config.flags import SECRET_OPTIONS
from pdlaunch.config.rules.host import LOCK_NAME, lock_name, log_dir_owner_refusal, make_log_dir, os_reason
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.log_tail import LogUnreadable, bounded_read

__all__ = ["LOCK_NAME", "LogDirInUse", "LogDirLock", "lock_name", "log_dir_holder"]


class LogDirInUse(PdlaunchError):
    """`log_dir` belongs to a deployment that is still running."""

    def __init__(self, log_dir: Path, holder: str) -> None:
        super().__init__(f"{str(log_dir)!r} holds the logs of a running deployment ({holder})", field="log_dir",
                         hint="pass --log-dir DIR with another directory, or stop that deployment first")


def masked_argv(argv: list[str]) -> list[str]:
    """`argv` with the value of every secret option (`--api-key KEY`, `--api-key=KEY`) replaced by `***`: the
    note is printed to whoever runs smoke or a second serve on this directory."""
    out: list[str] = []
    for arg in argv:
        option, eq, _ = arg.partition("=")
        if out and out[-1] in SECRET_OPTIONS:
            out.append("***")
        elif eq and option in SECRET_OPTIONS:
            out.append(f"{option}=***")
        else:
            out.append(arg)
    return out


def _describe(lock_file: Path) -> str:
    """The lock's owner as it wrote itself in `lock_file`, read within log_tail.TAIL_TIMEOUT_S (a lock on a hung file
    system must not hold the launcher)."""
    try:
        info = json.loads(bounded_read(lock_file, lock_file.read_text))
        where = f", proxy {info['proxy_url']}" if info.get("proxy_url") else ""
        return f"pid {info['pid']}: {info['command']}{where}"
    except LogUnreadable as exc:
        return f"its owner is unknown: {lock_file} could not be read within {exc.timeout:g}s (a hung file system?)"
    except (OSError, ValueError, KeyError, TypeError):
        return "its owner did not say who it is"


def log_dir_holder(log_dir: Path) -> str | None:
    """Who holds `log_dir` now (pid, command, proxy URL), or None when no live run does."""
    lock_file = log_dir / LOCK_NAME
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(lock_file)
    finally:
        os.close(fd)  # closing drops the shared lock we may have taken
    return None


class LogDirLock:
    """Held from before the first log file is opened until every child is reaped."""

    def __init__(self, log_dir: Path, node_rank: int = 0) -> None:
        self.log_dir = log_dir
        self.name = lock_name(node_rank)
        self._fd: int | None = None

    def acquire(self, proxy_url: str | None) -> None:
        """Take the lock or raise LogDirInUse naming the live holder. Writes nothing before it holds it."""
        if self._fd is not None:
            return
        lock_file = self.log_dir / self.name
        try:
            make_log_dir(self.log_dir)
            foreign = log_dir_owner_refusal(self.log_dir)
            if foreign is not None:
                raise PdlaunchError(foreign[0], field="log_dir", hint=foreign[1])
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)  # no O_TRUNC: the holder's note
        except (OSError, ValueError) as exc:  # check-config's look at the path cannot foresee every refusal
            reason = os_reason(exc) if isinstance(exc, OSError) else str(exc)
            # the directory, or the lock file in it (a directory in its place, a file of another user's)
            where = exc.filename if isinstance(exc, OSError) and exc.filename else self.log_dir
            raise PdlaunchError(f"cannot create or write {str(where)!r}: {reason}", field="log_dir",
                                hint="pass --log-dir DIR (or set log_dir) to a directory you can write, or "
                                "remove what is in the way") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LogDirInUse(self.log_dir, _describe(lock_file)) from None
        note = {"pid": os.getpid(), "command": " ".join(["pdlaunch", *masked_argv(sys.argv[1:])])[:300],
                "proxy_url": proxy_url}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(note).encode())
        except OSError as exc:  # a full disk or quota: the lock goes with the fd, or it outlives this failed run
            os.close(fd)
            raise PdlaunchError(f"cannot write {str(lock_file)!r}: {exc.strerror or exc}", field="log_dir",
                                hint="free space there, or pass --log-dir DIR (or set log_dir) on another "
                                "file system") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
