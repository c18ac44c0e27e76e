"""The launcher's files in log_dir never follow a symlink planted there, and a log_dir that someone else can write
is refused (review 76-I).

deployment.json (the 0600 file with the deployment secret), the lock file and each child's log have fixed names in
log_dir. Whoever owns or can write that directory (`--log-dir /tmp/pdlaunch` made by another user of a shared host)
could plant `deployment.json -> ~victim/.bashrc`, which serve then overwrote, or swap deployment.json between its
write and the instances' read. Now: every file there is opened with O_NOFOLLOW (deployment.json written to a
fresh file and renamed over the name), and a log_dir not owned by this user, or writable by its group or others,
is refused, by check-config and by the launcher, naming log_dir, the owner or mode found and the fix.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.deployment_secret import write_private
from pdlaunch.launcher.log_dir_lock import LOCK_NAME, LogDirLock
from pdlaunch.launcher.process import ChildProcess
from tests.config.cli_helpers import FREE_PORT, assert_invalid, check

BASHRC = "export PATH=/usr/bin\n"
OTHER_UID = 65534  # nobody


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "home" / ".bashrc"
    victim.parent.mkdir()
    victim.write_text(BASHRC)
    return victim


def _log_dir(tmp_path: Path) -> Path:
    log_dir = tmp_path / "logs"
    log_dir.mkdir(mode=0o755)
    return log_dir


def test_deployment_file_is_not_written_through_a_symlink(tmp_path: Path) -> None:
    victim, log_dir = _victim(tmp_path), _log_dir(tmp_path)
    os.symlink(victim, log_dir / "deployment.json")
    write_private(log_dir / "deployment.json", '{"security": {"deployment_secret": "s3cr3t-s3cr3t-s3cr3t"}}')
    assert victim.read_text() == BASHRC, "the symlink's target was overwritten"
    written = log_dir / "deployment.json"
    assert not written.is_symlink() and "s3cr3t" in written.read_text()
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert sorted(p.name for p in log_dir.iterdir()) == ["deployment.json"]  # no temporary file left behind


def test_deployment_file_replaces_an_old_one_readable_by_others(tmp_path: Path) -> None:
    log_dir = _log_dir(tmp_path)
    old = log_dir / "deployment.json"
    old.write_text("old")
    old.chmod(0o644)
    write_private(old, "new")
    assert old.read_text() == "new" and stat.S_IMODE(old.stat().st_mode) == 0o600


def test_lock_file_is_not_written_through_a_symlink(tmp_path: Path) -> None:
    victim, log_dir = _victim(tmp_path), _log_dir(tmp_path)
    os.symlink(victim, log_dir / LOCK_NAME)
    lock = LogDirLock(log_dir)
    with pytest.raises(PdlaunchError) as refused:
        lock.acquire(None)
    lock.release()
    assert victim.read_text() == BASHRC, "the symlink's target was overwritten"
    assert refused.value.field == "log_dir"
    assert refused.value.message == f"cannot create or write {str(log_dir / LOCK_NAME)!r}: it is a symlink, " \
                                     "which serve does not write through"


def test_a_childs_log_is_not_written_through_a_symlink(tmp_path: Path) -> None:
    victim, log_dir = _victim(tmp_path), _log_dir(tmp_path)
    os.symlink(victim, log_dir / "decode-0.log")
    child = ChildProcess("decode-0", ["true"], log_dir / "decode-0.log")
    for note in (None, "restart 1"):  # the first start truncates, a restart appends: neither follows the link
        with pytest.raises(PdlaunchError) as refused:
            child.start(note)
        assert refused.value.field == "log_dir"
        assert "it is a symlink, which serve does not write through" in refused.value.message
    assert victim.read_text() == BASHRC


def test_check_config_names_a_symlink_where_serve_writes_a_file(tmp_path: Path) -> None:
    victim, log_dir = _victim(tmp_path), _log_dir(tmp_path)
    os.symlink(victim, log_dir / "deployment.json")
    result = check(["--model", "tiny", "--log-dir", str(log_dir), *FREE_PORT])
    assert_invalid(result, "--log-dir", "is a symlink")


def test_a_log_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    log_dir = _log_dir(tmp_path)
    os.chown(log_dir, OTHER_UID, -1)
    result = check(["--model", "tiny", "--log-dir", str(log_dir), *FREE_PORT])
    assert_invalid(result, "--log-dir", f"(uid {OTHER_UID}), not to you, ")
    with pytest.raises(PdlaunchError) as refused:
        LogDirLock(log_dir).acquire(None)
    assert refused.value.field == "log_dir" and f"(uid {OTHER_UID}), not to you, " in refused.value.message
    assert refused.value.hint is not None and "a directory of your own" in refused.value.hint
    assert list(log_dir.iterdir()) == []  # refused before anything was written there


@pytest.mark.parametrize(("mode", "who"), [(0o775, "its group"), (0o757, "others"), (0o1777, "its group and others")])
def test_a_log_dir_others_can_write_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    log_dir = _log_dir(tmp_path)
    log_dir.chmod(mode)
    result = check(["--model", "tiny", "--log-dir", str(log_dir), *FREE_PORT])
    assert_invalid(result, "--log-dir", f"is writable by {who} (mode {mode & 0o7777:04o})")
    with pytest.raises(PdlaunchError) as refused:
        LogDirLock(log_dir).acquire(None)
    assert refused.value.hint is not None and f"chmod go-w {str(log_dir)!r}" in refused.value.hint
    assert list(log_dir.iterdir()) == []


def test_a_log_dir_serve_creates_is_not_writable_by_others(tmp_path: Path) -> None:
    """With umask 002 (Debian's default for a user with a group of their own) a `logs` made with the default
    mode would be group-writable, and refused by the next run."""
    old = os.umask(0o002)
    try:
        lock = LogDirLock(tmp_path / "made" / "logs")
        lock.acquire(None)
        lock.release()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "made" / "logs").stat().st_mode) == 0o750
    again = LogDirLock(tmp_path / "made" / "logs")
    again.acquire(None)
    again.release()
