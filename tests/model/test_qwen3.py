"""Qwen3 dense: config parsing as transformers' Qwen3Config derives it, q_norm/k_norm loading (whole
weights on every TP rank), check-config, and the fused Triton kernels (interpreter) vs transformers.

Greedy parity through the paged cache, the engine, TP, PD and offload is in the shared parity tests
(fixtures qwen3_ckpt, qwen3_tied_ckpt); this file holds what is particular to Qwen3.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdlaunch.config.model_info import load_model_info
from pdlaunch.errors import PdlaunchError
from pdlaunch.model import fused_norm, fused_ops, fused_rotary
from pdlaunch.model.arch import parse_hf_config
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from tests.config.cli_helpers import check
from tests.helpers.checkpoints import hf_greedy, hf_model
from tests.model.interpreter import INTERPRET_AT_START, run_interpreter_child
from tests.model.paged_runner import PagedRunner
from tests.model.test_parity import PROMPT

QWEN3: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 512,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "sliding_window": 8,
}


def test_head_dim_defaults_to_128_and_heads_are_normed() -> None:
    arch = parse_hf_config(QWEN3)
    assert arch.head_dim == 128  # Qwen3Config's default, not hidden_size / heads (16)
    assert arch.qk_norm and not arch.attention_bias and not arch.o_proj_bias
    assert arch.rope_theta == 1000000.0 and arch.rope_scaling is None
    assert not parse_hf_config({**QWEN3, "architectures": ["Qwen2ForCausalLM"]}).qk_norm


def test_attention_bias_puts_a_bias_on_q_k_v_and_o() -> None:
    arch = parse_hf_config({**QWEN3, "attention_bias": True})
    assert arch.attention_bias and arch.o_proj_bias


def test_transformers_4_dialect_reads_the_same() -> None:
    old = {k: v for k, v in QWEN3.items() if k != "rope_parameters"}
    assert parse_hf_config({**old, "rope_theta": 1000000.0, "rope_scaling": None}) == parse_hf_config(QWEN3)


@pytest.mark.parametrize("extra,types", [
    ({}, ["full_attention"] * 4),  # sliding_window is set but use_sliding_window is off
    ({"use_sliding_window": True, "max_window_layers": 2}, ["full_attention"] * 2 + ["sliding_attention"] * 2),
    ({"use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention"] * 2},
     ["sliding_attention", "full_attention"] * 2),
])
def test_sliding_layers_as_qwen3_config_derives_them(extra: dict[str, Any], types: list[str]) -> None:
    from transformers import Qwen3Config

    arch = parse_hf_config({**QWEN3, **extra})
    assert arch.layer_types == types
    hf = Qwen3Config(**{k: v for k, v in {**QWEN3, **extra}.items() if k != "architectures"})
    assert arch.layer_types == hf.layer_types
    assert arch.sliding_window == (8 if "sliding_attention" in types else None)


def test_every_tp_rank_holds_the_whole_q_and_k_norm(qwen3_ckpt: Path) -> None:
    """q_norm/k_norm are [head_dim], shared by all heads: rank 1 of 2 gets them unsplit (no process
    group is needed to load; only the forward pass communicates)."""
    tensors = load_file(str(qwen3_ckpt / "model.safetensors"))
    model = load_model(load_checkpoint(str(qwen3_ckpt)), torch.device("cpu"), torch.float32, tp_rank=1, tp_size=2)
    attn = model.model.layers[1].self_attn
    assert attn.num_heads == 2 and attn.num_kv_heads == 1 and attn.head_dim == 32
    torch.testing.assert_close(attn.q_norm.weight, tensors["model.layers.1.self_attn.q_norm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(attn.k_norm.weight, tensors["model.layers.1.self_attn.k_norm.weight"], rtol=0, atol=0)
    q_rows = tensors["model.layers.1.self_attn.q_proj.weight"][64:128]  # query heads 2 and 3
    torch.testing.assert_close(attn.qkv_proj.weight[:64], q_rows, rtol=0, atol=0)


def test_a_checkpoint_without_k_norm_names_it(qwen3_ckpt: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(qwen3_ckpt, tmp_path / "broken"))
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.0.self_attn.k_norm.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PdlaunchError, match="model.layers.0.self_attn.k_norm.weight"):
        load_model(load_checkpoint(str(broken)), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("fixture", ["qwen3_ckpt", "qwen3_tied_ckpt"])
def test_check_config_accepts_qwen3_and_counts_its_parameters(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    result = check(["--model", str(path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    info, problems = load_model_info(str(path))
    assert info is not None and not problems
    assert info.num_parameters() == sum(p.numel() for p in hf_model(path).parameters())


def test_fused_kernels_in_the_interpreter_match_transformers(qwen3_tied_ckpt: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every norm (q_norm/k_norm over [T*H, head_dim] rows included), the rotary, silu and KV write
    run as Triton kernels (the torch references are made to fail), float32 on CPU."""
    pytest.importorskip("triton")
    if not INTERPRET_AT_START:
        pytest.skip("runs in the child of test_interpreter_case_in_a_subprocess")
    monkeypatch.delenv("PDLAUNCH_FUSED_OPS", raising=False)
    for module, name in ((fused_norm, "rms_norm_torch"), (fused_norm, "fused_add_rms_norm_torch"),
                         (fused_rotary, "apply_rotary_torch"), (fused_ops, "silu_and_mul_torch"),
                         (fused_ops, "write_kv_torch")):
        monkeypatch.setattr(module, name, _forbid(name))
    model = load_model(load_checkpoint(str(qwen3_tied_ckpt)), torch.device("cpu"), torch.float32)
    assert fused_ops.fused_available(next(model.parameters()))
    ours = PagedRunner(model, block_size=4).greedy(PROMPT, 6, chunk=8)
    assert ours == hf_greedy(qwen3_tied_ckpt, PROMPT, 6)


def _forbid(name: str):  # noqa: ANN202
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} ran: the kernel case fell back to the torch reference")
    return fail


@pytest.mark.slow
def test_interpreter_case_in_a_subprocess() -> None:
    run_interpreter_child(__file__, "interpreter_match", "1 passed")
