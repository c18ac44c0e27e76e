"""`pdlaunch bench kv-transfer --kv-connector mooncake`: Mooncake rows next to NIXL's, bytes verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from tests.kv_transfer.mooncake_skip import requires_mooncake

runner = CliRunner()
SMALL = ["--device", "cpu", "--num-tokens", "17", "--num-layers", "2", "--num-kv-heads", "2", "--head-dim", "16",
         "--dtype", "float32", "--block-size", "8", "--iterations", "1"]


@pytest.mark.e2e
@requires_mooncake
@pytest.mark.slow
def test_mooncake_rows_next_to_nixl(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    result = runner.invoke(bench_app, ["kv-transfer", "--kv-connector", "mooncake", *SMALL, "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["connector"], r["mode"]) for r in rows] == [
        ("nixl", "pull"), ("nixl", "push"), ("mooncake", "pull"), ("mooncake", "push")]
    assert all(r["verified"] and r["gbps"] > 0 and r["bytes"] == 2 * (2 * 2 * 8 * 2 * 16 * 4) for r in rows)
    assert [r["transport"] for r in rows if r["connector"] == "mooncake"] == ["tcp", "tcp"]
    assert "connector (nixl)" in result.output and "connector (mooncake over tcp)" in result.output


def test_unknown_connector_is_refused() -> None:
    result = runner.invoke(bench_app, ["kv-transfer", "--kv-connector", "carrier-pigeon"])
    assert result.exit_code == 1 and "--kv-connector" in result.output and "nixl or mooncake" in result.output
