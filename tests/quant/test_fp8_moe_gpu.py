"""CUDA, FP8 MoE experts (W8A16 in the Triton kernels): with 128x128 block scales the fused path equals
the same kernels on the bf16-dequantized weights (each fp8 tile is scaled into exactly that weight) and the
per-expert reference loop within bf16 tolerance at 1, 7, 64 and 4096 tokens, replayed from a CUDA graph
(grouped_mm asked for gives way to Triton); a block-FP8 Qwen3-MoE checkpoint loads with fp8 experts whose
dequantization is the checkpoint's, and in the model's forward they give what the bf16-dequantized experts
give."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from pdlaunch.model.moe.fused import fused_moe, moe_reference, tile_for
from pdlaunch.model.moe.router import route
from pdlaunch.model.quant import fp8
from tests.model.paged_runner import PagedRunner

pytestmark = pytest.mark.gpu
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="needs a CUDA GPU with FP8 support (run `make test-gpu` on one)")
CUDA = torch.device("cuda")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@needs_fp8
@pytest.mark.parametrize("tokens", [1, 7, 64, 4096])
@pytest.mark.parametrize("expert_start", [0, 8])
def test_fp8_fused_moe_in_a_cuda_graph(tokens: int, expert_start: int) -> None:
    experts, local, top_k, hidden, inter = 32, 16, 4, 512, 256
    gen = torch.Generator(device=CUDA).manual_seed(tokens)
    x = torch.randn(tokens, hidden, device=CUDA, generator=gen).bfloat16()
    w13, s13 = fp8.quantize_stacked_blocks(0.05 * torch.randn(local, 2 * inter, hidden, device=CUDA, generator=gen))
    w2, s2 = fp8.quantize_stacked_blocks(0.05 * torch.randn(local, hidden, inter, device=CUDA, generator=gen))
    deq13 = fp8.dequantize_stacked_blocks(w13, s13).bfloat16()
    deq2 = fp8.dequantize_stacked_blocks(w2, s2).bfloat16()
    weights, ids = route(torch.randn(tokens, experts, device=CUDA, generator=gen), top_k, True)
    fused_moe(x, w13, w2, weights, ids, expert_start, use="triton", scales=(s13, s2))  # compile outside the capture
    fused_moe(x, deq13, deq2, weights, ids, expert_start, use="triton")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids, expert_start, use="grouped_mm", scales=(s13, s2))
    for _ in range(2):  # new tokens and new routing into the captured buffers
        x.copy_(torch.randn(tokens, hidden, device=CUDA, generator=gen))
        new_w, new_ids = route(torch.randn(tokens, experts, device=CUDA, generator=gen), top_k, True)
        weights.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        same_kernels = fused_moe(x, deq13, deq2, weights, ids, expert_start, use="triton")
        want = moe_reference(x.float(), deq13.float(), deq2.float(), weights, ids, expert_start)
        if tile_for(x, tokens, fp8=True).fp8_activations:  # this device's tile file quantizes activations
            assert _rel(out, same_kernels) < 6e-2 and _rel(out, want) < 6e-2
            continue
        assert _rel(out, same_kernels) < 1e-2
        torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@needs_fp8
@pytest.mark.parametrize("tokens", [1, 64, 4096])
def test_fp8_activations_w8a8_in_a_cuda_graph(tokens: int) -> None:
    """fp8 experts with fp8 activations (a tile with fp8_activations): quantization inside the graph, fp8 x fp8
    products (64-row tiles: warpgroup MMAs), within fp8's precision of the dequantized weights' result."""
    from pdlaunch.model.moe.layout import TileConfig

    experts, top_k, hidden, inter = 32, 4, 512, 256
    gen = torch.Generator(device=CUDA).manual_seed(300 + tokens)
    x = torch.randn(tokens, hidden, device=CUDA, generator=gen).bfloat16()
    w13, s13 = fp8.quantize_stacked_blocks(0.05 * torch.randn(experts, 2 * inter, hidden, device=CUDA, generator=gen))
    w2, s2 = fp8.quantize_stacked_blocks(0.05 * torch.randn(experts, hidden, inter, device=CUDA, generator=gen))
    deq13, deq2 = fp8.dequantize_stacked_blocks(w13, s13), fp8.dequantize_stacked_blocks(w2, s2)
    weights, ids = route(torch.randn(tokens, experts, device=CUDA, generator=gen), top_k, True)
    for block_m in (16, 64):
        tile = TileConfig(1 << 30, "triton", block_m, 64, 128, 4, 3, fp8_activations=True)
        fused_moe(x, w13, w2, weights, ids, tile=tile, scales=(s13, s2))  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused_moe(x, w13, w2, weights, ids, tile=tile, scales=(s13, s2))
        x.copy_(torch.randn(tokens, hidden, device=CUDA, generator=gen))
        graph.replay()
        want = moe_reference(x.float(), deq13, deq2, weights, ids)
        assert _rel(out, want) < 6e-2, block_m


@needs_fp8
@pytest.mark.parametrize("tokens", [1, 64])
def test_rows_are_not_zeroed_when_every_expert_is_here(tokens: int) -> None:
    """Given the model's expert count and holding all of them, the Triton backend skips zeroing the assignment
    rows (every one is written by the down GEMM): bit-equal to the zeroed rows, bf16 and fp8 experts."""
    experts, top_k, hidden, inter = 32, 4, 512, 256
    gen = torch.Generator(device=CUDA).manual_seed(600 + tokens)
    x = torch.randn(tokens, hidden, device=CUDA, generator=gen).bfloat16()
    w13 = 0.05 * torch.randn(experts, 2 * inter, hidden, device=CUDA, generator=gen)
    w2 = 0.05 * torch.randn(experts, hidden, inter, device=CUDA, generator=gen)
    q13, s13 = fp8.quantize_stacked_blocks(w13)
    q2, s2 = fp8.quantize_stacked_blocks(w2)
    weights, ids = route(torch.randn(tokens, experts, device=CUDA, generator=gen), top_k, True)
    for a, b, scales in ((w13.bfloat16(), w2.bfloat16(), None), (q13, q2, (s13, s2))):
        torch.empty(tokens * top_k * hidden * 4, device=CUDA).fill_(float("nan"))  # dirty the allocator's blocks
        zeroed = fused_moe(x, a, b, weights, ids, use="triton", scales=scales)
        unzeroed = fused_moe(x, a, b, weights, ids, use="triton", scales=scales, num_experts=experts)
        assert torch.equal(zeroed, unzeroed)


@needs_fp8
@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("mode", ["bf16", "w8a16", "w8f16", "w8a8"])
def test_swapped_operand_tiles_in_a_cuda_graph(tokens: int, mode: str) -> None:
    """Decode tiles with swap_ab (weight tile^T @ activations^T: the weight tile is the warpgroup MMA's 64-row
    side, the block's 16 rows its n), replayed from a CUDA graph with new tokens and routing: equal to the plain
    tile within 1e-2 for bf16 experts, fp8 experts (W8A16, and in float16 products: W8F16) and fp8 activations
    (W8A8), and within bf16 (fp8 activations: fp8) tolerance of the float32 per-expert loop."""
    from dataclasses import replace

    from pdlaunch.model.moe.layout import TileConfig

    experts, top_k, hidden, inter = 32, 4, 512, 256
    gen = torch.Generator(device=CUDA).manual_seed(400 + tokens)
    x = torch.randn(tokens, hidden, device=CUDA, generator=gen).bfloat16()
    w13 = 0.05 * torch.randn(experts, 2 * inter, hidden, device=CUDA, generator=gen)
    w2 = 0.05 * torch.randn(experts, hidden, inter, device=CUDA, generator=gen)
    scales: tuple[torch.Tensor, torch.Tensor] | None = None
    if mode == "bf16":
        w13, w2 = w13.bfloat16(), w2.bfloat16()
        deq13, deq2 = w13.float(), w2.float()
    else:
        w13, s13 = fp8.quantize_stacked_blocks(w13)
        w2, s2 = fp8.quantize_stacked_blocks(w2)
        scales = (s13, s2)
        deq13, deq2 = fp8.dequantize_stacked_blocks(w13, s13), fp8.dequantize_stacked_blocks(w2, s2)
    weights, ids = route(torch.randn(tokens, experts, device=CUDA, generator=gen), top_k, True)
    tile = TileConfig(1 << 30, "triton", 16, 64, 128, 4, 3, fp8_activations=mode == "w8a8", swap_ab=True,
                      f16_products=mode == "w8f16")
    fused_moe(x, w13, w2, weights, ids, tile=tile, scales=scales)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids, tile=tile, scales=scales)
    x.copy_(torch.randn(tokens, hidden, device=CUDA, generator=gen))
    new_w, new_ids = route(torch.randn(tokens, experts, device=CUDA, generator=gen), top_k, True)
    weights.copy_(new_w)
    ids.copy_(new_ids)
    graph.replay()
    plain = fused_moe(x, w13, w2, weights, ids, tile=replace(tile, swap_ab=False), scales=scales)
    assert _rel(out, plain) < 1e-2
    want = moe_reference(x.float(), deq13, deq2, weights, ids)
    assert _rel(out, want) < (6e-2 if mode == "w8a8" else 2e-2)


@needs_fp8
def test_block_fp8_moe_checkpoint_serves_fp8_experts(tmp_path: Path) -> None:
    from tests.helpers.fp8_checkpoints import make_fp8_qwen3

    served, reference = make_fp8_qwen3(tmp_path, "block", seed=12, moe=True)
    model = load_model(load_checkpoint(str(served)), CUDA, torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    assert experts.w13.dtype == fp8.FP8_DTYPE and experts.w2.dtype == fp8.FP8_DTYPE
    assert experts.w13_scale is not None and experts.w2_scale is not None
    assert tuple(experts.w13_scale.shape) == (4, 2, 2) and tuple(experts.w2_scale.shape) == (4, 2, 1)
    # Re-blocked from the checkpoint's dequantized weights: the same values up to bf16 rounding.
    ref = load_file(reference / "model.safetensors")
    got_gate = fp8.dequantize_stacked_blocks(experts.w13.data, experts.w13_scale.data)[1, :128].cpu()
    assert _rel(got_gate, ref["model.layers.0.mlp.experts.1.gate_proj.weight"]) < 1e-2
    got_down = fp8.dequantize_stacked_blocks(experts.w2.data, experts.w2_scale.data)[3].cpu()
    assert _rel(got_down, ref["model.layers.0.mlp.experts.3.down_proj.weight"]) < 1e-2
    # The experts' output inside the model (a forward hook on layer 0's experts) against the same kernels
    # on the bf16-dequantized weights and the float32 reference loop, for the inputs and routing the model
    # gave them. (Logits are not compared: the dense layers quantize their activations to e4m3 per token,
    # so a 0.5% change upstream flips fp8 roundings and moves the logits by a few percent either way.)
    seen: list[tuple[torch.Tensor, ...]] = []
    hook = experts.register_forward_hook(lambda _m, args, out: seen.append((*args, out)))
    rng = random.Random(5)
    PagedRunner(model).step({"s": [rng.randrange(3, 500) for _ in range(37)]})
    hook.remove()
    x, weights, ids, out = seen[0]
    assert out.shape == (37, ids.shape[1], x.shape[1])  # the decoder hands the unsummed rows to its next norm
    out = out.sum(dim=1)
    deq13 = fp8.dequantize_stacked_blocks(experts.w13.data, experts.w13_scale.data)
    deq2 = fp8.dequantize_stacked_blocks(experts.w2.data, experts.w2_scale.data)
    same_kernels = fused_moe(x, deq13.bfloat16(), deq2.bfloat16(), weights, ids, use="triton")
    bound = 6e-2 if tile_for(x, x.shape[0], fp8=True).fp8_activations else 1e-2  # W8A8 tiles: fp8's precision
    assert _rel(out, same_kernels) < bound
    assert _rel(out, moe_reference(x.float(), deq13, deq2, weights, ids)) < 2 * bound


@needs_fp8
def test_fp8_experts_with_the_attention_kept_in_bf16(tmp_path: Path) -> None:
    """A block-FP8 Qwen3-MoE checkpoint whose modules_to_not_convert lists the attention projections (README
    "FP8": the faster layout at batch 64 on an H200): on the GPU the attention is a bf16 layer, the experts fp8
    blocks and the dense MLP an fp8 layer, and a step runs."""
    from tests.helpers.fp8_checkpoints import keep_in_model_dtype, make_fp8_qwen3

    served, reference = make_fp8_qwen3(tmp_path, "block", seed=14, moe=True)
    keep_in_model_dtype(served, reference, ("q_proj", "k_proj", "v_proj", "o_proj"))
    model = load_model(load_checkpoint(str(served)), CUDA, torch.bfloat16)
    layers = model.model.decoder_layers
    for layer in layers:
        attn = layer.self_attn
        assert attn.qkv_proj.quant_method is None and attn.qkv_proj.weight.dtype == torch.bfloat16
        assert attn.o_proj.quant_method is None and attn.o_proj.weight.dtype == torch.bfloat16
    assert layers[0].mlp.experts.w13.dtype == fp8.FP8_DTYPE  # layer 0 is the MoE one, layer 1 dense
    assert layers[1].mlp.gate_up_proj.weight.dtype == fp8.FP8_DTYPE
    logits = PagedRunner(model).step({"s": [random.Random(7).randrange(3, 500) for _ in range(9)]})["s"]
    assert logits.shape[0] == 9 and torch.isfinite(logits).all()


@needs_fp8
def test_a_qwen2_moe_quantized_at_load_runs_its_shared_expert_in_fp8(tmp_path: Path) -> None:
    """`--quantization fp8` on a Qwen2-MoE: the shared expert's down projection is an fp8 layer whose product goes
    through its own FP8 matmul (a bare F.linear on its weight failed on every FP8 GPU); the logits stay near the
    bf16 model's (fp8 weights and per-token fp8 activations: a few percent)."""
    from tests.helpers.checkpoints import make_qwen2_moe

    path = str(make_qwen2_moe(tmp_path / "qwen2-moe"))
    prompt = {"s": [random.Random(9).randrange(3, 500) for _ in range(21)]}
    want = PagedRunner(load_model(load_checkpoint(path), CUDA, torch.bfloat16)).step(prompt)["s"]
    model = load_model(load_checkpoint(path, "fp8"), CUDA, torch.bfloat16)
    mlp = model.model.layers[0].mlp
    # (the tiny experts, 32 wide over a hidden size of 64, are not tiled by 128x128 blocks: they stay bf16)
    assert mlp.shared_expert.down_proj.weight.dtype == fp8.FP8_DTYPE and mlp.shared_expert.down_proj.quant_method
    got = PagedRunner(model).step(prompt)["s"]
    assert torch.isfinite(got).all() and _rel(got, want) < 0.1
