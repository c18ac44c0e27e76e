"""check-config refuses a TP size that cuts a block-FP8 MoE model's TP-split projections off the 128-wide scale
blocks, as the load would: Qwen2-MoE's shared expert (split by TP like a dense MLP, with expert parallel too) and the
dense layers of `mlp_only_layers` / `decoder_sparse_step`; not the routed experts (dequantized before they are
sharded, model/quant/experts.py) nor a dense `intermediate_size` no layer uses (Mixtral's and OLMoE's is the
experts' width)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import parse_hf_config
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from pdlaunch.model.quant.block_tp import block_misaligned
from pdlaunch.model.quant.config import parse_quant_config
from tests.helpers.fp8_checkpoints import make_block_fp8_qwen2_moe

# Qwen1.5-MoE-A2.7B's config.json (all 24 layers sparse): at TP 8 its shared expert is 704 rows a rank.
QWEN2_MOE: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936,
    "intermediate_size": 5632, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "num_experts": 60, "num_experts_per_tok": 4, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "max_position_embeddings": 8192, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
}
SHARED = "shared_expert gate_proj/up_proj/down_proj (config.json shared_expert_intermediate_size {}: {} a rank)"
DENSE = "gate_proj/up_proj/down_proj (config.json intermediate_size {}: {} a rank)"


def test_the_shared_expert_is_refused_where_its_tp_shards_cut_a_block() -> None:
    """The dense intermediate_size (no layer of this model uses it) is not what counts: the shared expert's is."""
    assert block_misaligned(parse_hf_config(QWEN2_MOE), 8) == [SHARED.format(5632, 704)]
    assert block_misaligned(parse_hf_config(QWEN2_MOE), 4) == []  # 1408 = 11 blocks a rank
    aligned_shared = {**QWEN2_MOE, "intermediate_size": 1408, "shared_expert_intermediate_size": 4096}
    assert block_misaligned(parse_hf_config(aligned_shared), 8) == []  # every layer sparse: 1408 is unused


def _kept(*modules: str) -> Callable[[str], bool]:
    quant = parse_quant_config({
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic",
        "modules_to_not_convert": ["lm_head", *modules]})
    assert quant is not None
    return quant.skips


def test_projections_the_checkpoint_keeps_unquantized_are_not_refused() -> None:
    """They load in the model dtype, whatever their shards (the load checks block edges of fp8 layers only)."""
    assert block_misaligned(parse_hf_config(QWEN2_MOE), 8, _kept("re:.*shared_expert\\.")) == []
    assert block_misaligned(parse_hf_config(QWEN2_MOE), 8, _kept("model.layers.23.mlp.shared_expert.down_proj")) \
        == [SHARED.format(5632, 704)]  # the other layers' shared experts are fp8
    small_heads = {**QWEN2_MOE, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64}
    assert block_misaligned(parse_hf_config(small_heads), 8, _kept("re:.*shared_expert\\.")) == ["k_proj/v_proj"]
    assert block_misaligned(parse_hf_config(small_heads), 8, _kept("re:.*shared_expert\\.", "re:.*self_attn")) == []


@pytest.mark.parametrize("dense, want", [({}, []), ({"mlp_only_layers": [3]}, [DENSE.format(5632, 704)]),
                                         ({"decoder_sparse_step": 2}, [DENSE.format(5632, 704)])])
def test_qwen3_moe_dense_layers_count_only_where_the_model_has_them(dense: dict[str, Any], want: list[str]) -> None:
    """Qwen3-30B-A3B's shape with a dense width of 5632 (704 rows a rank at TP 8)."""
    cfg = {**QWEN2_MOE, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_key_value_heads": 4,
           "head_dim": 128, "num_attention_heads": 32, "moe_intermediate_size": 768, "num_experts": 128,
           "num_experts_per_tok": 8, **dense}
    del cfg["shared_expert_intermediate_size"]
    assert block_misaligned(parse_hf_config(cfg), 8) == want


@pytest.mark.parametrize("architecture", ["MixtralForCausalLM", "OlmoeForCausalLM"])
def test_routed_experts_width_is_not_a_dense_width(architecture: str) -> None:
    """Mixtral's and OLMoE's intermediate_size is their experts' width: 1408 at TP 8 (176 a rank) loads (the
    experts dequantize before they are sharded and stay in the model dtype where blocks do not tile a rank)."""
    cfg = {"architectures": [architecture], "hidden_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 16,
           "num_key_value_heads": 8, "vocab_size": 1000, "intermediate_size": 1408, "num_local_experts": 8,
           "num_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 4096}
    assert block_misaligned(parse_hf_config(cfg), 8) == []


@pytest.fixture(scope="module")
def qwen2_moe_384(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Block-FP8 Qwen2-MoE whose shared expert is 384 wide (3 blocks): TP 2 gives a rank 192 rows, half a block."""
    return make_block_fp8_qwen2_moe(tmp_path_factory.mktemp("fp8") / "qwen2-moe-block", shared=384)


def _check(path: Path, *flags: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["check-config", "--model", str(path), "--device", "cpu", *flags])
    return result.exit_code, " ".join(result.output.split())


def test_check_config_passes_the_checkpoint_at_tp_1_which_loads(qwen2_moe_384: Path) -> None:
    assert _check(qwen2_moe_384, "--tp", "1")[0] == 0
    model = load_model(load_checkpoint(str(qwen2_moe_384)), torch.device("cpu"), torch.float32)
    assert model.model.layers[0].mlp.shared_expert is not None


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_check_config_refuses_what_the_load_refuses_per_instance_group(qwen2_moe_384: Path,
                                                                        expert_parallel: bool) -> None:
    """Prefill at TP 1 is fine, decode at TP 2 is not; expert parallel places whole routed experts but still splits
    the shared expert by TP, and the load refuses it either way."""
    ep = ["--enable-expert-parallel"] if expert_parallel else []
    code, text = _check(qwen2_moe_384, "--prefill-tp", "1", "--decode-tp", "2", *ep)
    assert code == 1, text
    assert "--prefill-tp" not in text
    assert (f"--decode-tp: TP 2 splits the block-FP8 projections {SHARED.format(384, 192)} off the 128-wide "
            "scale blocks") in text
    assert ("use a TP size whose shards are whole 128-row blocks (or a per-channel FP8 checkpoint, or the "
            "unquantized checkpoint with --quantization fp8)") in text
    assert ("expert parallel places whole routed experts but splits the shared expert by TP" in text) == expert_parallel
    refused = f"parallel.tp: TP 2 splits the block-FP8 projections {SHARED.format(384, 192)} off the 128-wide scale"
    with pytest.raises(PdlaunchError, match=re.escape(refused)):  # in check-config's words
        load_model(load_checkpoint(str(qwen2_moe_384)), torch.device("cpu"), torch.float32, tp_rank=1, tp_size=2,
                   expert_parallel=expert_parallel)


def test_a_block_aligned_shared_expert_passes_at_tp_2(tmp_path: Path) -> None:
    path = make_block_fp8_qwen2_moe(tmp_path / "qwen2-moe-block", shared=256)
    assert json.loads((path / "config.json").read_text())["shared_expert_intermediate_size"] == 256
    code, text = _check(path, "--tp", "2")
    assert code == 0, text
