"""`pdlaunch bench make-checkpoint`'s shards are readable as its config.json is (0666 less the umask): safetensors
writes its files 0600, so a checkpoint made by one user (root on a node, a hostPath volume) could not be read by
the instances of another (a pod's user), though its config and tokenizer could."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdlaunch.bench import checkpoint_shapes
from pdlaunch.bench.cli import bench_app
from tests.bench.test_audit3_make_checkpoint import ARGS, TINY


@pytest.fixture
def umask_022(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(checkpoint_shapes.SHAPES, "llama3-8b", TINY)
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


@pytest.mark.usefixtures("umask_022")
def test_every_file_of_the_checkpoint_has_the_same_readable_mode(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(bench_app, ["make-checkpoint", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    shards = [name for name in modes if name.endswith(".safetensors")]
    assert len(shards) > 1
    assert set(modes.values()) == {0o644}, {name: oct(mode) for name, mode in modes.items()}
