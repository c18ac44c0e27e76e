"""FP8 MoE experts held as 128x128-block fp8 (FusedExperts.to_fp8_blocks), on CPU: the stacked
quantization equals the per-matrix one, the reference backend with scales equals the reference on the
dequantized weights, and widths that are not multiples of 128 stay as they are; experts a checkpoint keeps
unquantized stay so, and Qwen2-MoE's shared expert multiplies through its FP8 down projection."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdlaunch.model.moe.experts import FusedExperts
from pdlaunch.model.moe.fused import fused_moe, moe_reference
from pdlaunch.model.moe.router import route
from pdlaunch.model.quant import fp8


def _experts(num_experts: int, hidden: int, inter: int, seed: int = 0, **kw: object) -> FusedExperts:
    gen = torch.Generator().manual_seed(seed)
    experts = FusedExperts(num_experts, hidden, inter, **kw)  # type: ignore[arg-type]
    with torch.no_grad():
        experts.w13.copy_(0.05 * torch.randn(experts.w13.shape, generator=gen))
        experts.w2.copy_(0.05 * torch.randn(experts.w2.shape, generator=gen))
    return experts


def test_stacked_block_quantization_equals_the_per_matrix_one() -> None:
    w = 0.05 * torch.randn(3, 256, 384, generator=torch.Generator().manual_seed(1))
    q, s = fp8.quantize_stacked_blocks(w)
    assert q.dtype == fp8.FP8_DTYPE and s.shape == (3, 2, 3)
    for e in range(3):
        q_e, s_e = fp8.quantize_block(w[e])
        assert torch.equal(q[e].view(torch.uint8), q_e.view(torch.uint8)) and torch.equal(s[e], s_e)
        assert torch.equal(fp8.dequantize_stacked_blocks(q, s)[e], fp8.dequantize(q_e, s_e, 128))
    rel = (fp8.dequantize_stacked_blocks(q, s) - w).norm() / w.norm()
    assert 0 < rel < 0.05  # e4m3 rounding: a few percent, never exact on random weights


def test_fp8_experts_forward_equals_the_reference_on_dequantized_weights() -> None:
    experts = _experts(8, 256, 256)
    original = experts.w13.detach().clone(), experts.w2.detach().clone()
    assert experts.to_fp8_blocks() and experts.to_fp8_blocks()  # idempotent
    assert experts.w13.dtype == fp8.FP8_DTYPE and experts.w2.dtype == fp8.FP8_DTYPE
    assert experts.w13_scale is not None and experts.w2_scale is not None
    assert tuple(experts.w13_scale.shape) == (8, 4, 2) and tuple(experts.w2_scale.shape) == (8, 2, 2)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 256, generator=gen)
    weights, ids = route(torch.randn(9, 8, generator=gen), 2, True)
    got = experts(x, weights, ids)
    w13 = fp8.dequantize_stacked_blocks(experts.w13.data, experts.w13_scale.data)
    w2 = fp8.dequantize_stacked_blocks(experts.w2.data, experts.w2_scale.data)
    assert torch.equal(got, moe_reference(x, w13, w2, weights, ids))
    unquantized = moe_reference(x, *original, weights, ids)
    assert 0 < ((got - unquantized).norm() / unquantized.norm()).item() < 0.1
    # fused_moe called directly with the scales takes the same path (the Triton one: tests/quant/test_fp8_moe_gpu.py)
    assert torch.equal(fused_moe(x, experts.w13, experts.w2, weights, ids, use="reference",
                                 scales=(experts.w13_scale, experts.w2_scale)), got)


def test_tensor_parallel_shard_is_quantized_per_rank_and_misaligned_widths_stay() -> None:
    rank1 = _experts(4, 256, 512, tp_rank=1, tp_size=2)
    assert rank1.inter_local == 256 and rank1.to_fp8_blocks()
    assert rank1.w13_scale is not None and tuple(rank1.w13_scale.shape) == (4, 4, 2)
    narrow = _experts(4, 256, 192)  # 192 is not a multiple of 128: a block would straddle gate and up
    before = narrow.w13.data.clone()
    assert not narrow.to_fp8_blocks()
    assert narrow.w13_scale is None and narrow.w13.dtype == torch.float32 and torch.equal(narrow.w13.data, before)


def test_fp8_experts_converts_aligned_layers_and_names_the_others_width(caplog: pytest.LogCaptureFixture) -> None:
    from torch import nn

    from pdlaunch.model.loader import fp8_experts

    model = nn.ModuleList([_experts(4, 256, 256), _experts(4, 256, 256, seed=1)])
    assert fp8_experts(model) == 2 and all(m.w13.dtype == fp8.FP8_DTYPE for m in model)  # type: ignore[union-attr]
    assert not caplog.records
    narrow = nn.ModuleList([_experts(4, 256, 256), _experts(4, 256, 192)])
    with caplog.at_level("WARNING"):
        assert fp8_experts(narrow) == 1
    assert "expert width per rank (192)" in caplog.text and "not a multiple of 128" in caplog.text


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_a_block_fp8_checkpoint_loads_its_experts_as_fp8_blocks(tmp_path: Path, expert_parallel: bool) -> None:
    """The loaders quantize each expert as it arrives (the experts never exist in the model dtype): the
    checkpoint's own fp8 values come back bit for bit, and its scales, and the model computes what the
    dequantized checkpoint computes. With expert parallel, rank 1 of 2 holds experts 2 and 3 whole."""
    from safetensors.torch import load_file

    from pdlaunch.model.checkpoint import load_checkpoint
    from pdlaunch.model.loader import load_model
    from tests.helpers.fp8_checkpoints import make_fp8_qwen3
    from tests.model.paged_runner import PagedRunner

    served, _ = make_fp8_qwen3(tmp_path, "block", seed=12, moe=True)
    ckpt = load_checkpoint(str(served))
    rank = {"tp_rank": 1, "tp_size": 2, "expert_parallel": True} if expert_parallel else {}
    model = load_model(ckpt, torch.device("cpu"), torch.float32, fp8_experts_on_load=True, **rank)
    experts = model.model.layers[0].mlp.experts
    assert experts.w13.dtype == fp8.FP8_DTYPE and experts.w13_scale is not None and experts.w2_scale is not None
    tensors = load_file(served / "model.safetensors")
    for local in range(experts.num_local):
        e = experts.expert_start + local
        for rows, proj in ((slice(0, 128), "gate_proj"), (slice(128, 256), "up_proj")):
            stored = tensors[f"model.layers.0.mlp.experts.{e}.{proj}.weight"]
            assert torch.equal(experts.w13.data[local, rows].view(torch.uint8), stored.view(torch.uint8))
            torch.testing.assert_close(experts.w13_scale.data[local, rows.start // 128: rows.stop // 128],
                                       tensors[f"model.layers.0.mlp.experts.{e}.{proj}.weight_scale_inv"],
                                       rtol=1e-6, atol=0)
        down = tensors[f"model.layers.0.mlp.experts.{e}.down_proj.weight"]
        assert torch.equal(experts.w2.data[local].view(torch.uint8), down.view(torch.uint8))
    if expert_parallel:
        return  # a rank's partial sum is not a whole model's logits
    prompt = list(range(5, 40))
    with_fp8 = PagedRunner(model).step({"s": prompt})["s"]
    dequantized = load_model(ckpt, torch.device("cpu"), torch.float32)
    assert dequantized.model.layers[0].mlp.experts.w13.dtype == torch.float32  # the CPU default
    want = PagedRunner(dequantized).step({"s": prompt})["s"]
    assert ((with_fp8 - want).norm() / want.norm()).item() < 1e-4


def test_quantization_fp8_makes_a_bf16_moe_checkpoints_experts_fp8_blocks_on_load(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from pdlaunch.model.checkpoint import load_checkpoint
    from pdlaunch.model.loader import load_model
    from tests.helpers.fp8_checkpoints import make_fp8_qwen3

    served, _ = make_fp8_qwen3(tmp_path, "online", seed=12, moe=True)  # a plain float32 checkpoint
    model = load_model(load_checkpoint(str(served), "fp8"), torch.device("cpu"), torch.float32,
                       fp8_experts_on_load=True)
    experts = model.model.layers[0].mlp.experts
    assert experts.w2.dtype == fp8.FP8_DTYPE and experts.w2_scale is not None
    want = load_file(served / "model.safetensors")["model.layers.0.mlp.experts.2.down_proj.weight"]
    got = fp8.dequantize_stacked_blocks(experts.w2.data, experts.w2_scale.data)[2]
    assert 0 < ((got - want).norm() / want.norm()).item() < 0.05  # e4m3 rounding of the float32 weights


def test_experts_the_checkpoint_keeps_unquantized_stay_in_the_model_dtype(tmp_path: Path) -> None:
    """A block-FP8 checkpoint whose modules_to_not_convert lists the experts of layer 0 (their weights in float32,
    no scales): on an FP8 GPU they were quantized into fp8 blocks at load all the same, computing another model
    than the checkpoint's. They stay as they are, and the model computes what it computes without FP8 experts."""
    import json

    from safetensors.torch import load_file, save_file

    from pdlaunch.model.checkpoint import load_checkpoint
    from pdlaunch.model.loader import load_model
    from tests.helpers.fp8_checkpoints import make_fp8_qwen3, make_qwen3_moe_base
    from tests.model.paged_runner import PagedRunner

    served, _ = make_fp8_qwen3(tmp_path, "block", seed=12, moe=True)
    original = load_file(make_qwen3_moe_base(tmp_path / "original", seed=12) / "model.safetensors")
    experts = [f"model.layers.0.mlp.experts.{e}.{proj}" for e in range(4) for proj in ("gate_proj", "up_proj",
                                                                                         "down_proj")]
    tensors = {name: t for name, t in load_file(served / "model.safetensors").items()
               if name.rsplit(".", 1)[0] not in experts}
    tensors.update({f"{module}.weight": original[f"{module}.weight"] for module in experts})  # not e4m3-exact
    save_file(tensors, served / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((served / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = ["lm_head", *experts]
    (served / "config.json").write_text(json.dumps(cfg))

    ckpt = load_checkpoint(str(served))
    model = load_model(ckpt, torch.device("cpu"), torch.float32, fp8_experts_on_load=True)
    layer = model.model.layers[0].mlp.experts
    assert layer.w13.dtype == layer.w2.dtype == torch.float32 and layer.w13_scale is None
    assert torch.equal(layer.w2.data[3], original["model.layers.0.mlp.experts.3.down_proj.weight"])
    prompt = list(range(5, 40))
    want = PagedRunner(load_model(ckpt, torch.device("cpu"), torch.float32)).step({"s": prompt})["s"]
    assert torch.equal(PagedRunner(model).step({"s": prompt})["s"], want)


def test_the_shared_expert_multiplies_through_its_fp8_down_projection(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen2-MoE with --quantization fp8, its linear layers kept fp8 as on an FP8 GPU (emulated here: FP8 GEMMs
    said available, the per-channel GEMM a float32 product of the dequantized weight): the shared expert's
    down_proj holds fp8 weights, which its F.linear on the bare weight refused (float != Float8_e4m3fn) on every
    FP8 GPU. It now runs the layer's FP8 matmul and the logits are those of the weights dequantized at load."""
    import torch.nn.functional as F

    from pdlaunch.model.checkpoint import load_checkpoint
    from pdlaunch.model.loader import load_model
    from pdlaunch.model.quant import gemm, linear
    from tests.helpers.checkpoints import make_qwen2_moe
    from tests.model.paged_runner import PagedRunner

    ckpt = load_checkpoint(str(make_qwen2_moe(tmp_path / "qwen2-moe")), "fp8")
    prompt = list(range(5, 30))
    want = PagedRunner(load_model(ckpt, torch.device("cpu"), torch.float32)).step({"s": prompt})["s"]
    calls: list[tuple[int, ...]] = []

    def channel_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        calls.append(tuple(weight.shape))
        return F.linear(x.float(), fp8.dequantize(weight, scale.reshape(-1))).to(dtype)

    monkeypatch.setattr(linear, "fp8_gemm_available", lambda device: True)
    monkeypatch.setattr(gemm, "channel_fp8_linear", channel_gemm)
    model = load_model(ckpt, torch.device("cpu"), torch.float32, fp8_experts_on_load=False)
    down = model.model.layers[0].mlp.shared_expert.down_proj
    assert down.weight.dtype == fp8.FP8_DTYPE and down.quant_method is not None
    got = PagedRunner(model).step({"s": prompt})["s"]
    assert tuple(down.weight.shape) in calls
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
