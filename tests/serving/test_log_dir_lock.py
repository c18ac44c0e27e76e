"""One live deployment per log directory (launcher/log_dir_lock.py); the e2e beside a live serve is in
test_new_user_e2e.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pdlaunch.launcher.log_dir_lock import LogDirInUse, LogDirLock, log_dir_holder


def test_a_second_holder_is_refused_naming_the_first_until_it_lets_go(tmp_path: Path) -> None:
    first = LogDirLock(tmp_path / "logs")
    first.acquire("http://127.0.0.1:8000")
    holder = log_dir_holder(tmp_path / "logs")
    assert holder is not None and f"pid {os.getpid()}" in holder and "http://127.0.0.1:8000" in holder
    with pytest.raises(LogDirInUse) as refused:
        LogDirLock(tmp_path / "logs").acquire(None)
    assert refused.value.field == "log_dir" and f"pid {os.getpid()}" in refused.value.render()
    first.release()
    assert log_dir_holder(tmp_path / "logs") is None
    again = LogDirLock(tmp_path / "logs")
    again.acquire(None)
    again.release()


def test_nodes_of_one_deployment_may_share_a_directory(tmp_path: Path) -> None:
    node0, node1 = LogDirLock(tmp_path, node_rank=0), LogDirLock(tmp_path, node_rank=1)
    node0.acquire(None)
    node1.acquire(None)
    with pytest.raises(LogDirInUse):
        LogDirLock(tmp_path, node_rank=1).acquire(None)
    node0.release()
    node1.release()


def test_no_holder_for_a_directory_never_used(tmp_path: Path) -> None:
    assert log_dir_holder(tmp_path / "nothing-here") is None
