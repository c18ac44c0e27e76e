"""A Mistral-format `consolidated.safetensors` beside the transformers-format weights (Mistral's repositories
ship both, with no index for a single shard): the transformers weights load, as vLLM loads them."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from pdlaunch.model.weight_files import safetensors_files
from tests.config.cli_helpers import invoke
from tests.helpers.checkpoints import make_llama


def test_the_consolidated_copy_is_left_out_and_the_checkpoint_serves(tmp_path: Path) -> None:
    path = make_llama(tmp_path / "m")
    save_file({"tok_embeddings.weight": torch.zeros(4, 4), "layers.0.attention.wq.weight": torch.zeros(4, 4)},
              str(path / "consolidated.safetensors"))
    assert [f.name for f in safetensors_files(path)] == ["model.safetensors"]
    result = invoke(["generate", str(path), "--device", "cpu", "--max-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert invoke(["check-config", str(path), "--device", "cpu"]).exit_code == 0


def test_a_consolidated_file_alone_is_still_read(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "consolidated.safetensors"))
    assert [f.name for f in safetensors_files(tmp_path)] == ["consolidated.safetensors"]
