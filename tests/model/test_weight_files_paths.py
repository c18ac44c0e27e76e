"""Weight files that are not where, or not what, their names say: a `*.safetensors` entry that is a broken symlink or
a directory, and a model.safetensors.index.json whose weight_map names a file outside the checkpoint directory. The
load and check-config both name the file and what is wrong with it, instead of a traceback, a misleading problem or
weights read from elsewhere."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from pdlaunch.config.rules.checkpoint import checkpoint_problems
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model


def _load(path: Path) -> None:
    load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)


def _messages(path: Path) -> list[str]:
    return [p.message for p in checkpoint_problems(str(path))]


def test_a_broken_symlink_among_the_weights_is_named(llama_ckpt: Path, tmp_path: Path) -> None:
    # an HF cache snapshot whose blob was deleted: a traceback (FileNotFoundError from stat) before
    path = shutil.copytree(llama_ckpt, tmp_path / "dangling")
    os.symlink(tmp_path / "gone" / "blob", path / "model-extra.safetensors")
    with pytest.raises(PdlaunchError, match=r"model-extra\.safetensors is a broken symlink") as err:
        _load(path)
    assert err.value.field == "model.path"
    assert any("model-extra.safetensors is a broken symlink" in m for m in _messages(path))


def test_a_directory_named_like_a_weight_file_is_named(llama_ckpt: Path, tmp_path: Path) -> None:
    # safetensors' own "No such device (os error 19)" OSError before
    path = shutil.copytree(llama_ckpt, tmp_path / "dir")
    (path / "extra.safetensors").mkdir()
    with pytest.raises(PdlaunchError, match=r"extra\.safetensors is not a regular file"):
        _load(path)
    assert any("extra.safetensors is not a regular file" in m for m in _messages(path))


def test_a_weight_file_that_cannot_be_opened_is_named(llama_ckpt: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # an OSError from safetensors' open (permission denied, an I/O error) was a traceback
    from pdlaunch.model import loader

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("Permission denied (os error 13)")

    monkeypatch.setattr(loader, "safe_open", refuse)
    with pytest.raises(PdlaunchError, match=r"model\.safetensors cannot be read \(Permission denied"):
        _load(llama_ckpt)


def _point_index(path: Path, target: str) -> str:
    """Every tensor of the first shard now listed under `target`; the shard's name."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: target if v == shard else v for k, v in index["weight_map"].items()}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard


@pytest.mark.parametrize("outside", ["../elsewhere/{shard}", "{abs}/{shard}", ""])
def test_an_index_pointing_outside_the_directory_is_refused(sharded_ckpt: Path, tmp_path: Path, outside: str) -> None:
    # the load read a shard from ../elsewhere (or any absolute path) and check-config said the shard "does not hold"
    # its tensors; "" was "<the directory> is missing"
    path = shutil.copytree(sharded_ckpt, tmp_path / "ckpt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard = sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))[0]
    shutil.move(path / shard, elsewhere / shard)
    target = outside.format(shard=shard, abs=elsewhere)
    _point_index(path, target)
    with pytest.raises(PdlaunchError, match="which is not a file inside the checkpoint directory") as err:
        _load(path)
    assert repr(target) in str(err.value) and err.value.field == "model.path"
    assert any("not a file inside the checkpoint directory" in m for m in _messages(path))


def test_an_index_naming_a_shard_in_a_subdirectory_loads_and_checks(sharded_ckpt: Path, tmp_path: Path) -> None:
    # a relative path inside the directory is where the load reads it: check-config compared only the file's base
    # name with the index entry, and said the shard "does not hold" its tensors
    path = shutil.copytree(sharded_ckpt, tmp_path / "ckpt")
    shard = sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))[0]
    (path / "weights").mkdir()
    shutil.move(path / shard, path / "weights" / shard)
    _point_index(path, f"weights/{shard}")
    _load(path)
    assert _messages(path) == []
