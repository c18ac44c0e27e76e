"""`pdlaunch render kubernetes --out ""` (an unset `$DIR`) is refused naming --out: it wrote every manifest, the
deployment secret's among them, into the current directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.config.cli_helpers import assert_invalid, invoke

RENDER = ["render", "kubernetes", "--model", "tiny", "--image", "registry.example.com/pdlaunch:1.0"]


@pytest.mark.parametrize("out", ["", " "])
def test_an_empty_out_writes_nothing_into_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 out: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert_invalid(invoke([*RENDER, "--out", out]), "--out", "names no directory")
    assert sorted(tmp_path.iterdir()) == []


def test_a_named_out_still_gets_the_manifests(tmp_path: Path) -> None:
    result = invoke([*RENDER, "--out", str(tmp_path / "manifests")])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "manifests").iterdir())
    assert names and names[0] == "00-secret-pdlaunch-deployment.yaml", names
    assert f"kubectl apply -f {tmp_path / 'manifests'}" in " ".join(result.output.split())
