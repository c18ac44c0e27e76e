"""`bench serve` whose result JSON cannot be written once the run is over (a full disk, said where the data reaches
it): the report is printed first, then one error line naming the flag and the path, exit 1, no traceback; and no
half-written file: an earlier result under that name stays whole, nothing is left beside it."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from tests.bench.fake_openai import fake_server


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an open file through /proc")
@pytest.mark.parametrize("mode", [["--num-prompts", "2"],
                                  ["--multi-turn", "--num-conversations", "1", "--num-turns", "1", "--endpoint",
                                   "/v1/chat/completions"]])
def test_a_full_disk_is_one_error_line_after_the_report(tmp_path: Path, mode: list[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "result.json"
    out.write_text('{"earlier": true}\n')
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the result file's data reaches a full disk; nothing else is written
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".result.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with fake_server() as (url, _):
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", url, *mode, "--random-input-len", "3",
                                                "--random-output-len", "2", "--result-filename", str(out)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    text = " ".join(result.output.split())
    error = f"error: --result-filename: could not write the results to '{out}': No space left on device"
    assert error in text
    assert text.index("Successful requests") < text.index(error)  # the figures were printed before
    assert json.loads(out.read_text()) == {"earlier": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
