"""`bench make-checkpoint OUT_DIR`: its errors name the argument as the usage line shows it (OUT_DIR), not as
the Python parameter (out_dir)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app


def _flat(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(bench_app, ["make-checkpoint", *args])
    return result.exit_code, " ".join(result.output.split())


def test_errors_name_out_dir_as_the_usage_line_does(tmp_path: Path) -> None:
    code, usage = _flat("--help")
    assert code == 0 and "OUT_DIR" in usage and "out_dir" not in usage
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    code, text = _flat(str(tmp_path / "full"), "--device", "cpu")
    assert code == 1 and f"error: OUT_DIR: {tmp_path / 'full'} is not empty" in text, text
    code, text = _flat()
    assert code == 2 and "Missing argument 'OUT_DIR'" in text and "out_dir" not in text, text
