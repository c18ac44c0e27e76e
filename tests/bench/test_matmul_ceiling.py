"""The prefill FLOP rate of `bench compare` (issue 29): the model's FLOPs per prompt token, the matmul ceiling
measured in a child process, and the share of it a rate point's prefill throughput is."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pdlaunch.bench import matmul_ceiling
from pdlaunch.bench.checkpoint_shapes import LLAMA3_8B, QWEN3_30B_A3B
from pdlaunch.bench.matmul_ceiling import MatmulCeiling, Yardstick, measure_in_child
from pdlaunch.config.model_info import ModelInfo, _from_hf_dict
from pdlaunch.errors import PdlaunchError


def _info(hf: dict[str, object]) -> ModelInfo:
    info, problems = _from_hf_dict(dict(hf), "test")
    assert info is not None, problems
    return info


def test_llama3_8b_prefill_flops_are_the_benchmarks_count() -> None:
    # the same count as benchmarks/limits.py (tests/bench/test_limits_arithmetic.py): linear layers, causal
    # attention, the last token's logits
    linear = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
    expected = 2 * linear * 4096 + 2 * 4096**2 * 4096 * 32 + 2 * 4096 * 128256
    assert _info(LLAMA3_8B).prefill_flops(4096) == expected


def test_moe_prefill_flops_count_the_routed_experts_only() -> None:
    h, layers, t = 2048, 48, 8192
    projections = h * 32 * 128 * 2 + 2 * h * 4 * 128  # q, o; k, v
    mlp = 128 * h + 8 * 3 * h * 768  # the router over 128 experts, then top-8 of them
    expected = 2 * layers * (projections + mlp) * t + 2 * t * t * 32 * 128 * layers + 2 * h * 151936
    info = _info(QWEN3_30B_A3B)
    assert info.prefill_flops(t) == expected
    # a dense layer among the sparse ones multiplies through its whole MLP
    dense_first = _info({**QWEN3_30B_A3B, "mlp_only_layers": [0]})
    assert dense_first.prefill_flops(t) - expected == 2 * t * (3 * h * 6144 - mlp)


def test_shared_expert_and_its_gate_count_for_every_token() -> None:
    qwen2_moe = {"architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                 "moe_intermediate_size": 32, "shared_expert_intermediate_size": 96, "num_experts": 4,
                 "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "vocab_size": 100, "norm_topk_prob": False}
    without = _info({**qwen2_moe, "shared_expert_intermediate_size": 0})
    # 10 tokens x 2 layers x (the shared expert 3 x 64 x 96 + its gate 64), 2 FLOPs each
    assert _info(qwen2_moe).prefill_flops(10) - without.prefill_flops(10) == 2 * 10 * 2 * (3 * 64 * 96 + 64)


def test_yardstick_share_is_tokens_times_flops_over_the_ceiling() -> None:
    ceiling = MatmulCeiling(device="cuda:0 (NVIDIA H200)", dtype="bfloat16", n=8192, ms=1.6, tflops=687.0)
    stick = Yardstick(input_len=3072, flops_per_token=16e9, ceiling=ceiling)
    share = stick.share(30000.0)
    assert share is not None
    assert share.tflops == pytest.approx(480.0) and share.of_matmul == pytest.approx(480.0 / 687.0)
    assert stick.share(None) is None and stick.share(0.0) is None  # no prefill step ran
    blind = Yardstick(input_len=3072, flops_per_token=16e9, no_ceiling="no GPU")
    assert blind.share(30000.0) == matmul_ceiling.PrefillShare(tflops=480.0, of_matmul=None)


def test_ceiling_is_measured_in_a_child_process_on_cpu() -> None:
    ceiling = measure_in_child("cpu", 0, "float32")
    assert ceiling.device.startswith("cpu (") and ceiling.dtype == "float32" and ceiling.n == 1024
    assert ceiling.tflops == pytest.approx(2 * 1024**3 / ceiling.ms / 1e9)


def test_a_missing_gpu_is_an_error_with_the_childs_reason() -> None:
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("this host has 8 GPUs")
    with pytest.raises(PdlaunchError, match=r"the matmul ceiling on cuda failed \(exit 1\): error: GPU 7 is not "
                                            r"visible"):
        measure_in_child("cuda", 7, "bfloat16")


def test_the_module_runs_as_a_command_and_rejects_bad_arguments() -> None:
    bad = subprocess.run([sys.executable, "-m", "pdlaunch.bench.matmul_ceiling", "--device", "cpu", "--dtype",
                          "int8"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 1 and "invalid choice: 'int8'" in bad.stderr


@pytest.mark.gpu
def test_ceiling_on_a_gpu_in_bfloat16() -> None:
    ceiling = measure_in_child("cuda", 0, "bfloat16")  # the child checks the product against float64
    assert ceiling.device.startswith("cuda:0 (") and ceiling.n == 8192 and ceiling.dtype == "bfloat16"
