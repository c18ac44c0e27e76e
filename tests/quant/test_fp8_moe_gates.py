"""The small replicated linear layers of an MoE block, the router (`mlp.gate`, Mixtral's `block_sparse_moe.gate`) and
Qwen2-MoE's `shared_expert_gate`, stored in FP8 by a checkpoint that quantizes them. llm-compressor quantizes every
Linear its `ignore` does not name, and the router pattern MoE recipes list (`re:.*mlp.gate$`) does not name
`shared_expert_gate`: such a checkpoint was refused, its fp8 gate said to be a module config.json "does not quantize
(modules_to_not_convert / ignore lists it ...)", which it did not. These layers now meet their scale at load and are
dequantized, as the experts are: greedy ids equal transformers on the dequantized weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdlaunch.config.rules.checkpoint import checkpoint_problems
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from tests.helpers.checkpoints import hf_greedy, make_qwen2_moe
from tests.helpers.fp8_checkpoints import channel_quant
from tests.model.paged_runner import PagedRunner

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate", "shared_expert_gate")
_GROUP = {"targets": ["Linear"], "format": "float-quantized",
          "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
          "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                "dynamic": True}}


def _fp8_qwen2_moe(root: Path, ignore: list[str]) -> tuple[Path, Path]:
    """(a per-channel compressed-tensors Qwen2-MoE quantizing every linear layer `ignore` does not name, its float32
    reference with the dequantized weights), the way llm-compressor's FP8-Dynamic scheme writes one."""
    served, reference = make_qwen2_moe(root / "served"), make_qwen2_moe(root / "reference")
    out: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    for name, w in load_file(served / "model.safetensors").items():
        module = name.removesuffix(".weight")
        skipped = any(re.match(entry[3:], module) if entry.startswith("re:") else module.endswith("." + entry)
                      or module == entry for entry in ignore)
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in _LINEARS or skipped:
            out[name] = ref[name] = w
            continue
        q, scale = channel_quant(w.float())
        out[name], out[f"{module}.weight_scale"], ref[name] = q, scale.to(torch.bfloat16), \
            q.float() * scale.to(torch.bfloat16).float()
    save_file(out, served / "model.safetensors", metadata={"format": "pt"})
    save_file(ref, reference / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((served / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                  "quantization_status": "compressed", "ignore": ignore, "sparsity_config": {},
                                  "kv_cache_scheme": None, "config_groups": {"group_0": _GROUP}}
    (served / "config.json").write_text(json.dumps(cfg, indent=2))
    return served, reference


@pytest.mark.parametrize("ignore", [["lm_head", "re:.*mlp.gate$"], ["lm_head"]],
                         ids=["shared-expert-gate", "router-too"])
def test_fp8_moe_gates_are_dequantized_at_load(ignore: list[str], tmp_path: Path) -> None:
    served, reference = _fp8_qwen2_moe(tmp_path, ignore)
    stored = load_file(served / "model.safetensors")
    assert stored["model.layers.0.mlp.shared_expert_gate.weight"].dtype == torch.float8_e4m3fn
    assert (stored["model.layers.0.mlp.gate.weight"].dtype == torch.float8_e4m3fn) == (len(ignore) == 1)
    assert checkpoint_problems(str(served)) == []
    model = load_model(load_checkpoint(str(served)), torch.device("cpu"), torch.float32)
    ref = load_file(reference / "model.safetensors")
    block = model.model.layers[1].mlp
    assert torch.equal(block.shared_expert_gate.weight, ref["model.layers.1.mlp.shared_expert_gate.weight"])
    assert torch.equal(block.gate.weight, ref["model.layers.1.mlp.gate.weight"])
    prompt = list(range(5, 30))
    assert PagedRunner(model).greedy(prompt, 12) == hf_greedy(reference, prompt, 12)


def test_an_fp8_gate_without_its_scale_names_the_scale(tmp_path: Path) -> None:
    served, _ = _fp8_qwen2_moe(tmp_path, ["lm_head", "re:.*mlp.gate$"])
    tensors = load_file(served / "model.safetensors")
    del tensors["model.layers.1.mlp.shared_expert_gate.weight_scale"]
    save_file(tensors, served / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PdlaunchError, match="lacks tensor.s. model.layers.1.mlp.shared_expert_gate.weight_scale"):
        load_model(load_checkpoint(str(served)), torch.device("cpu"), torch.float32)
