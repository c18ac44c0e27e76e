"""TP > 1 with what its instances refuse at start (distributed/executor.py): check-config refuses it first, naming the
field, as serve would fail only once its instances started."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from pdlaunch.cli import app
from tests.config.cli_helpers import assert_invalid, check

TARGET = ["--target-gpus", "4", "--target-gpu-memory", "80"]


def test_the_storage_connector_with_tp_2_is_refused() -> None:
    assert_invalid(check(["--model", "tiny", "--device", "cpu", "--kv-connector", "storage", "--tp", "2"]),
                   "--kv-connector", "does not run with TP > 1 yet: instances[0] (prefill, TP 2)")
    assert check(["--model", "tiny", "--device", "cpu", "--kv-connector", "storage", "--tp", "2",
                  "--colocated"]).exit_code == 0  # colocated instances move no KV
    assert check(["--model", "tiny", "--device", "cpu", "--kv-connector", "storage"]).exit_code == 0


def test_sleep_mode_with_tp_2_is_refused() -> None:
    assert_invalid(check(["--model", "tiny", "--device", "cuda", *TARGET, "--enable-sleep-mode", "--tp", "2"]),
                   "--enable-sleep-mode", "not supported with TP > 1")
    assert check(["--model", "tiny", "--device", "cuda", *TARGET, "--enable-sleep-mode"]).exit_code == 0


def test_render_kubernetes_refuses_sleep_mode_with_tp_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["render", "kubernetes", "--model", "tiny", "--device", "cuda", "--tp", "2",
                                      "--enable-sleep-mode", "--out", str(tmp_path / "m"), "--image", "x"])
    assert result.exit_code == 1 and "sleep mode is not supported with TP > 1" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "m").exists()

