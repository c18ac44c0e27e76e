"""FP8 checkpoints on CPU: weights dequantized once at load, greedy ids == transformers on the
dequantized float32 weights, at TP 1 and TP 2 (block scales sharded with their weight)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.model.quant.fp8 import FP8_DTYPE
from tests.engine.conftest import MakeEngine, run_all
from tests.engine.test_engine_parity import assert_same_greedy, hf_reference, random_prompts
from tests.helpers.fp8_checkpoints import keep_in_model_dtype, make_fp8_qwen3
from tests.tp.conftest import MakeTPEngine

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("scheme", ["block", "channel", "tensor", "online"])
def test_fp8_greedy_matches_dequantized_transformers(scheme: str, fp8_ckpts: dict[str, tuple[Path, Path]],
                                                     make_engine: MakeEngine) -> None:
    served, reference = fp8_ckpts[scheme]
    extra = {"quantization": "fp8"} if scheme == "online" else {}
    engine = make_engine(served, max_num_batched_tokens=16, **extra)  # 16 chunks the 21-token prompt
    model = engine.runner.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    # CPU: dequantized into the model dtype, an ordinary layer again (no scale parameter left).
    assert qkv.weight.dtype == torch.float32 and qkv.quant_method is None
    assert not any(n.endswith(("weight_scale", "weight_scale_inv")) for n, _ in model.named_parameters())
    assert engine.checkpoint.quant is not None
    prompts = random_prompts([5, 21], seed=4)
    for prompt, out in zip(prompts, run_all(engine, prompts, GREEDY)):
        assert_same_greedy(out.output_token_ids, hf_reference(reference, prompt, GREEDY.max_tokens))


def test_fp8_ignored_module_keeps_its_dtype(tmp_path: Path, make_engine: MakeEngine) -> None:
    """modules_to_not_convert: a listed module loads its bf16/fp32 weight, no scale needed."""
    served, reference = make_fp8_qwen3(tmp_path, "block")
    keep_in_model_dtype(served, reference, ("down_proj",))
    engine = make_engine(served)
    prompt = random_prompts([7], seed=9)[0]
    out = run_all(engine, [prompt], GREEDY)[0]
    assert_same_greedy(out.output_token_ids, hf_reference(reference, prompt, GREEDY.max_tokens))


def test_fp8_moe_experts_with_the_attention_kept_in_the_model_dtype(tmp_path: Path, make_engine: MakeEngine) -> None:
    """A block-FP8 Qwen3-MoE checkpoint whose modules_to_not_convert lists the attention projections (the faster
    layout at decode batches on an H200, README "FP8"): the attention loads its own weights, the experts and the
    dense MLP their fp8 ones, and greedy ids equal transformers on those weights."""
    served, reference = make_fp8_qwen3(tmp_path, "block", moe=True)
    keep_in_model_dtype(served, reference, ("q_proj", "k_proj", "v_proj", "o_proj"))
    engine = make_engine(served, max_num_batched_tokens=16)
    prompts = random_prompts([5, 21], seed=11)
    for prompt, out in zip(prompts, run_all(engine, prompts, GREEDY)):
        assert_same_greedy(out.output_token_ids, hf_reference(reference, prompt, GREEDY.max_tokens))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_fp8_tp2_matches_transformers(scheme: str, fp8_ckpts: dict[str, tuple[Path, Path]],
                                      make_tp_engine: MakeTPEngine) -> None:
    # Block scales follow the weight's shards block by block; channel scales follow the output rows of a
    # column-parallel shard and stay whole for a row-parallel one (o_proj, down_proj).
    served, reference = fp8_ckpts[scheme]
    engine = make_tp_engine(served, 2, max_num_batched_tokens=16)
    assert engine.runner.tp_size == 2
    prompts = random_prompts([5, 21], seed=5)
    for prompt, out in zip(prompts, run_all(engine, prompts, GREEDY)):
        assert_same_greedy(out.output_token_ids, hf_reference(reference, prompt, GREEDY.max_tokens))


def test_block_scales_follow_tp_shards(fp8_ckpts: dict[str, tuple[Path, Path]]) -> None:
    """TP rank 1 of 2 loads the second half of each weight with its own blocks' scales: dequantized,
    its down_proj is the reference's second column half and its qkv the q rows then KV head 1."""
    from safetensors.torch import load_file

    from pdlaunch.model.checkpoint import load_checkpoint
    from pdlaunch.model.loader import load_model

    served, reference = fp8_ckpts["block"]
    model = load_model(load_checkpoint(str(served)), torch.device("cpu"), torch.float32, tp_rank=1, tp_size=2)
    ref = load_file(reference / "model.safetensors")
    layer = model.model.layers[0]
    assert torch.equal(layer.mlp.down_proj.weight, ref["model.layers.0.mlp.down_proj.weight"][:, 128:])
    attn = "model.layers.0.self_attn"
    expected = torch.cat([ref[f"{attn}.q_proj.weight"][128:], ref[f"{attn}.k_proj.weight"][128:],
                          ref[f"{attn}.v_proj.weight"][128:]])
    assert torch.equal(layer.self_attn.qkv_proj.weight, expected)
    assert FP8_DTYPE != layer.self_attn.qkv_proj.weight.dtype


def test_block_fp8_moe_experts_dequantized_at_load(tmp_path: Path, make_engine: MakeEngine) -> None:
    """A block-FP8 Qwen3-MoE (experts, attention and the dense layer in FP8, the router not): each expert's
    weight meets its scale at load and is dequantized; greedy ids == transformers on the dequantized weights."""
    from pdlaunch.config.rules.checkpoint import checkpoint_problems
    from tests.helpers.fp8_checkpoints import make_fp8_qwen3

    served, reference = make_fp8_qwen3(tmp_path, "block", seed=12, moe=True)
    assert checkpoint_problems(str(served)) == []
    engine = make_engine(served, max_num_batched_tokens=16)
    experts = engine.runner.model.model.layers[0].mlp.experts
    assert experts.w13.dtype == torch.float32
    prompts = random_prompts([5, 21], seed=7)
    for prompt, out in zip(prompts, run_all(engine, prompts, GREEDY)):
        assert_same_greedy(out.output_token_ids, hf_reference(reference, prompt, GREEDY.max_tokens))


@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_a_quantized_lm_head_is_dequantized_at_load(scheme: str, tmp_path: Path, make_engine: MakeEngine) -> None:
    """A checkpoint whose ignore / modules_to_not_convert leaves lm_head out stores it in fp8 with its scale, as it
    does every other linear layer (llm-compressor quantizes every Linear its ignore leaves). The output projection
    computes in the model dtype: it is dequantized at load, and greedy ids equal transformers on those weights. It
    was refused as a module config.json "does not quantize (modules_to_not_convert / ignore lists it ...)"."""
    import json

    from safetensors.torch import load_file, save_file

    from tests.helpers.fp8_checkpoints import _block_dequant, _block_quant, channel_quant

    served, reference = make_fp8_qwen3(tmp_path, scheme)
    tensors, ref = load_file(served / "model.safetensors"), load_file(reference / "model.safetensors")
    if scheme == "block":
        q, scale = _block_quant(ref["lm_head.weight"].float())
        tensors["lm_head.weight"], tensors["lm_head.weight_scale_inv"] = q, scale
        ref["lm_head.weight"] = _block_dequant(q, scale)
    else:
        q, scale = channel_quant(ref["lm_head.weight"].float())
        tensors["lm_head.weight"], tensors["lm_head.weight_scale"] = q, scale
        ref["lm_head.weight"] = q.float() * scale
    save_file(tensors, served / "model.safetensors", metadata={"format": "pt"})
    save_file(ref, reference / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((served / "config.json").read_text())
    key = "modules_to_not_convert" if scheme == "block" else "ignore"
    cfg["quantization_config"][key] = []
    (served / "config.json").write_text(json.dumps(cfg))
    engine = make_engine(served)
    assert torch.equal(engine.runner.model.lm_head.weight, ref["lm_head.weight"])
    prompt = random_prompts([9], seed=5)[0]
    out = run_all(engine, [prompt], GREEDY)[0]
    assert_same_greedy(out.output_token_ids, hf_reference(reference, prompt, GREEDY.max_tokens))
