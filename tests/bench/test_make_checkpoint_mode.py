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


@pytest.mark.usefixtures("umask_022")
def test_a_shard_whose_mode_cannot_be_set_is_still_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting the mode is a courtesy to other users, not part of writing the checkpoint: a filesystem without modes
    (vfat, a CIFS share) or a shard another user made (--overwrite in a shared, group-writable folder: only a file's
    owner may chmod it) refuses it with EPERM, and the whole checkpoint failed and was removed for it."""
    chmod = Path.chmod

    def refuse(path: Path, mode: int, **kwargs: bool) -> None:
        if path.suffix == ".safetensors":
            raise PermissionError(1, "Operation not permitted", str(path))
        chmod(path, mode, **kwargs)

    monkeypatch.setattr(Path, "chmod", refuse)
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(bench_app, ["make-checkpoint", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "config.json").is_file()
