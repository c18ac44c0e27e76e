"""`bench serve` whose result JSON cannot be written once the run is over (here a full disk: the file is a link to
/dev/full): the report is printed first, then one error line naming the flag and the path, exit 1, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from tests.bench.fake_openai import fake_server


@pytest.mark.parametrize("mode", [["--num-prompts", "2"],
                                  ["--multi-turn", "--num-conversations", "1", "--num-turns", "1", "--endpoint",
                                   "/v1/chat/completions"]])
def test_a_full_disk_is_one_error_line_after_the_report(tmp_path: Path, mode: list[str]) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    out = tmp_path / "result.json"
    out.symlink_to("/dev/full")
    with fake_server() as (url, _):
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", url, *mode, "--random-input-len", "3",
                                                "--random-output-len", "2", "--result-filename", str(out)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    text = " ".join(result.output.split())
    error = f"error: --result-filename: could not write the results to '{out}': No space left on device"
    assert error in text
    assert text.index("Successful requests") < text.index(error)  # the figures were printed before
