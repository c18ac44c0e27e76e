"""`pdlaunch bench make-checkpoint DIR --overwrite` over an earlier checkpoint of more shards left that checkpoint's
other shards in DIR (`model-00002-of-00003.safetensors` beside the new `model-00001-of-00001.safetensors`): gigabytes
nobody reads (the index names the new shard only), which the free-space check had counted as freed, and which a
tool that loads every *.safetensors of a folder reads as a second copy of the weights. The earlier checkpoint's
weight files are now replaced, and only those: a file of another name in DIR stays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.test_audit3_make_checkpoint import ARGS, _run, tiny_shape  # noqa: F401 (a fixture)


@pytest.mark.usefixtures("tiny_shape")
def test_overwrite_replaces_the_earlier_checkpoints_weight_files(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    assert _run(str(out), *ARGS).exit_code == 0
    before = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(before) > 1, before  # several shards of 64 KiB
    (out / "model.safetensors").write_bytes(b"")  # a single-file checkpoint's weights, also an earlier one's
    (out / "notes.txt").write_text("mine")
    (out / "adapter.safetensors").write_bytes(b"")  # not a checkpoint's weight file name: not ours to remove
    result = _run(str(out), *ARGS[:2], "--device", "cpu", "--overwrite")  # one shard of the default 4 GiB
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00001.safetensors"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["adapter.safetensors", *shards]
    assert (out / "notes.txt").read_text() == "mine"
