"""A model with tied embeddings (the output projection is the embedding table) whose FP8 checkpoint still stores an
lm_head, quantized with its scale (its ignore list leaves lm_head out). The stored lm_head is not used, scale and
all, as vLLM skips every `lm_head.` tensor of a tied model: the dense model refused its `lm_head.weight_scale` as an
unexpected tensor, while an MoE one (whose fp8 layers meet their scales first) loaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pdlaunch.config.rules.checkpoint import checkpoint_problems
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from tests.helpers.checkpoints import hf_greedy
from tests.helpers.fp8_checkpoints import channel_quant, make_fp8_qwen3
from tests.model.paged_runner import PagedRunner


def _tied_with_a_quantized_lm_head(root: Path) -> tuple[Path, Path]:
    """(a per-channel FP8 Qwen3 with tied embeddings storing an fp8 lm_head and its scale, its float32 reference)."""
    served, reference = make_fp8_qwen3(root, "channel")
    tensors, ref = load_file(served / "model.safetensors"), load_file(reference / "model.safetensors")
    q, scale = channel_quant(tensors["model.embed_tokens.weight"].float())
    tensors["lm_head.weight"], tensors["lm_head.weight_scale"] = q, scale
    ref.pop("lm_head.weight")
    save_file(tensors, served / "model.safetensors", metadata={"format": "pt"})
    save_file(ref, reference / "model.safetensors", metadata={"format": "pt"})
    for directory in (served, reference):
        cfg = json.loads((directory / "config.json").read_text())
        cfg["tie_word_embeddings"] = True
        if "quantization_config" in cfg:
            cfg["quantization_config"]["ignore"] = []
        (directory / "config.json").write_text(json.dumps(cfg))
    return served, reference


def test_a_tied_models_quantized_lm_head_is_not_used(tmp_path: Path) -> None:
    served, reference = _tied_with_a_quantized_lm_head(tmp_path)
    assert checkpoint_problems(str(served)) == []
    model = load_model(load_checkpoint(str(served)), torch.device("cpu"), torch.float32)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    prompt = list(range(5, 30))
    assert PagedRunner(model).greedy(prompt, 8) == hf_greedy(reference, prompt, 8)
