"""`pdlaunch bench kv-transfer --kv-cache-dtype fp8` moves e4m3 blocks: a quarter of float32's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app


@pytest.mark.e2e
def test_kv_transfer_bench_fp8_moves_a_quarter_of_float32(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    result = CliRunner().invoke(bench_app, [
        "kv-transfer", "--device", "cpu", "--mode", "push", "--num-tokens", "17", "--num-layers", "2",
        "--num-kv-heads", "2", "--head-dim", "16", "--dtype", "float32", "--kv-cache-dtype", "fp8",
        "--block-size", "8", "--iterations", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())
    assert row["verified"] is True and row["bytes"] == 2 * (2 * 2 * 8 * 2 * 16 * 4) // 4
