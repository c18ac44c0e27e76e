"""`pdlaunch bench make-checkpoint` stopped partway (a full disk, Ctrl-C) removes the files it wrote: a folder of
some shards and no config.json is no checkpoint, and the next run called it "not empty". A disk full partway is
one line naming OUT_DIR, not safetensors' exception; a checkpoint the disk cannot hold is refused before the first
shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from safetensors import SafetensorError
from typer.testing import CliRunner

from pdlaunch.bench import checkpoint_shapes, make_checkpoint
from pdlaunch.bench.checkpoint_tokenizer import TOKENIZER_FILES
from pdlaunch.bench.cli import bench_app

# llama3-8b's shape, small enough to write in a moment; 64 KiB shards make several files
TINY = {**checkpoint_shapes.LLAMA3_8B, "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1024}
ARGS = ["--num-layers", "2", "--max-shard-gib", str(64 / 2**20), "--device", "cpu"]


@pytest.fixture
def tiny_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(checkpoint_shapes.SHAPES, "llama3-8b", TINY)


def _failing_save(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> list[str]:
    """save_file writes the first shard, then raises `error`; returns the files it was asked to write."""
    asked: list[str] = []
    real = make_checkpoint.save_file

    def save(tensors: Any, path: str, metadata: Any = None) -> None:
        asked.append(path)
        if len(asked) > 1:
            Path(path).write_bytes(b"\0" * 100)  # what a write cut short leaves
            raise error
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(make_checkpoint, "save_file", save)
    return asked


def _run(*args: str) -> Any:
    result = CliRunner().invoke(bench_app, ["make-checkpoint", *args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.mark.usefixtures("tiny_shape")
def test_a_full_disk_partway_is_one_line_and_leaves_no_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _failing_save(monkeypatch, SafetensorError("Error while serializing: I/O error: No space left on "
                                                       "device (os error 28)"))
    out = tmp_path / "ckpt"
    result = _run(str(out), *ARGS)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    flat = " ".join(result.output.split())
    assert f"error: OUT_DIR: cannot write the checkpoint into {out}: I/O error: No space left on device" in flat
    assert "the files written so far were removed" in flat
    assert len(asked) == 2 and not out.exists()  # the folder it made is gone with the shards


@pytest.mark.usefixtures("tiny_shape")
def test_ctrl_c_partway_exits_130_and_removes_only_what_it_wrote(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _failing_save(monkeypatch, KeyboardInterrupt())
    result = _run(str(out), *ARGS, "--overwrite")
    assert result.exit_code == 130, result.output
    assert f"interrupted: the files written so far were removed from {out}" in " ".join(result.output.split())
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.usefixtures("tiny_shape")
def test_the_checkpoint_is_whole_when_nothing_goes_wrong(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    result = _run(str(out), *ARGS)
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "generation_config.json", *TOKENIZER_FILES
            } <= names and len([n for n in names if n.endswith(".safetensors")]) > 1


def test_a_checkpoint_larger_than_the_disk_is_refused_before_any_file(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """10**5 layers of Llama-3-8B (43 TB): refused at once, not after filling the disk."""
    monkeypatch.setattr(make_checkpoint, "save_file", lambda *_, **__: pytest.fail("a shard was written"))
    out = tmp_path / "ckpt"
    result = _run(str(out), "--num-layers", str(10**5), "--device", "cpu")
    assert result.exit_code == 1, result.output
    flat = " ".join(result.output.split())
    assert "error: OUT_DIR: the checkpoint takes 40,628.5 GiB" in flat and f"the disk holding {out} has" in flat, flat
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["", "--overwrite"], "error: OUT_DIR: is empty (an unset variable?)"),
    (["ckpt", "--max-shard-gib", "1e300"], "error: --max-shard-gib: 1e+300 is not a positive size in GiB"),
])
def test_an_empty_out_dir_or_an_endless_shard_size_is_one_error_line(args: list[str], message: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`make-checkpoint ""` (an unset $DIR) became the current folder, which --overwrite then filled with shards;
    --max-shard-gib 1e300 overflowed into a traceback."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(bench_app, ["make-checkpoint", *args], env={"COLUMNS": "1000"}, terminal_width=1000)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output, result.output
    assert list(tmp_path.iterdir()) == []
