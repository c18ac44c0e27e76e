"""check-config on an FP8 MoE checkpoint with one expert's weight or scale missing or of the wrong dtype names
that one problem, as the load does: it no longer also calls the expert's (present) weight missing, or says the
same missing tensor twice."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.config.cli_helpers import check
from tests.helpers.fp8_checkpoints import make_fp8_qwen3

EXPERT = "model.layers.0.mlp.experts.1.up_proj"


def _drop_scale(t: dict[str, torch.Tensor]) -> None:
    del t[f"{EXPERT}.weight_scale_inv"]


def _drop_weight(t: dict[str, torch.Tensor]) -> None:
    del t[f"{EXPERT}.weight"]


def _float_weight(t: dict[str, torch.Tensor]) -> None:
    t[f"{EXPERT}.weight"] = t[f"{EXPERT}.weight"].float()


@pytest.mark.parametrize("edit,expected", [
    (_drop_scale, f"checkpoint lacks tensor(s) {EXPERT}.weight_scale_inv"),
    (_drop_weight, f"checkpoint lacks tensor(s) {EXPERT}.weight"),
    (_float_weight, f"tensor '{EXPERT}.weight' is float32 but has a scale"),
])
def test_one_problem_per_broken_fp8_expert(tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], None],
                                           expected: str) -> None:
    served, _ = make_fp8_qwen3(tmp_path, "block", moe=True)
    tensors = load_file(served / "model.safetensors")
    edit(tensors)
    save_file(tensors, served / "model.safetensors", metadata={"format": "pt"})
    result = check([str(served), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    problems = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(problems) == 1 and expected in problems[0], problems
