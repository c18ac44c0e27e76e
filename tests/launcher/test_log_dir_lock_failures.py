"""A run that cannot write its log-dir lock note (a full disk, a quota) fails naming log_dir, with no traceback,
and leaves the directory free: the lock is dropped with the failed run, not held until the process ends."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.log_dir_lock import LOCK_NAME, LogDirLock, log_dir_holder


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
