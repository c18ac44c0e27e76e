"""A run that cannot write its log-dir lock note (a full disk, a quota) fails naming log_dir, with no traceback,
and leaves the directory free: the lock is dropped with the failed run, not held until the process ends."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.log_dir_lock import LOCK_NAME, LogDirInUse, LogDirLock, log_dir_holder


def test_a_lock_note_that_cannot_be_written_is_an_error_and_leaves_the_directory_free(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr("pdlaunch.launcher.log_dir_lock.os.write", full_disk)
        with pytest.raises(PdlaunchError) as refused:
            LogDirLock(tmp_path / "logs").acquire(None)
    assert refused.value.field == "log_dir" and "No space left on device" in refused.value.message
    assert LOCK_NAME in refused.value.message
    assert log_dir_holder(tmp_path / "logs") is None  # the failed run holds nothing: the next one may start
    again = LogDirLock(tmp_path / "logs")
    again.acquire(None)
    again.release()


def test_a_lock_file_that_cannot_be_opened_is_named_not_its_directory(tmp_path: Path) -> None:
    """A directory where the lock file goes (or a lock file of another user's): the message named only the log
    directory, which exists and is writable, and said "Is a directory"."""
    (tmp_path / "logs" / LOCK_NAME).mkdir(parents=True)
    with pytest.raises(PdlaunchError) as refused:
        LogDirLock(tmp_path / "logs").acquire(None)
    assert refused.value.field == "log_dir"
    assert refused.value.message == f"cannot create or write {str(tmp_path / 'logs' / LOCK_NAME)!r}: Is a directory"
    assert refused.value.hint is not None and "remove what is in the way" in refused.value.hint


def test_a_log_dir_that_cannot_be_created_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused_mkdir(path: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))  # as for a user without the right

    monkeypatch.setattr(Path, "mkdir", refused_mkdir)
    with pytest.raises(PdlaunchError) as refused:
        LogDirLock(tmp_path / "logs").acquire(None)
    assert refused.value.message == f"cannot create or write {str(tmp_path / 'logs')!r}: Permission denied"


def test_a_live_holder_whose_note_is_corrupt_still_refuses_a_second_run(tmp_path: Path) -> None:
    """The note says who holds the directory; unreadable, the refusal still comes, without a traceback."""
    lock_file = tmp_path / LOCK_NAME
    lock_file.write_bytes(b"\xff\xfe{[")
    holder = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: flock refuses this process too
        assert log_dir_holder(tmp_path) == "its owner did not say who it is"
        with pytest.raises(LogDirInUse) as refused:
            LogDirLock(tmp_path).acquire(None)
        assert "holds the logs of a running deployment (its owner did not say who it is)" in refused.value.message
    finally:
        os.close(holder)
