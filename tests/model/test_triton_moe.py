"""The Triton MoE kernels (model/moe/triton_moe.py, gemm_kernels.py, align_kernels.py) without a GPU: on CPU
tensors under TRITON_INTERPRET=1 (in a child pytest started with the variable set, as in test_triton_decode.py)
against the per-expert reference loop, and compiled for sm_90 to read the PTX. The CUDA cases (graphs, the tile
files, speed) are in test_moe_gpu.py and tests/quant/test_fp8_moe_gpu.py.

Interpreter cases: float32 at 1, 7 and 64 tokens, all experts here and half of them (expert parallel: the other
rank's assignments add nothing), an expert width that is not a multiple of the column tile (masked columns);
fp8 experts with 128x128 block scales equal the same kernels on the dequantized 16-bit weights and the float32
loop within 16-bit tolerance (W8A16), and with fp8 activations (W8A8) the loop on the fp8-rounded activations.
The fp8 cases against the reference run at 1 token (the layout read from the ids, DIRECT) and 7 (the aligned
layout, one block an expert, masked rows); 64 tokens (experts with several row blocks) runs the same kernels with
the same constexprs, and the fp8 scales are indexed by expert and k/n block, not by row block: 64 tokens in fp8
are the swapped-tile cases (against the plain tile) and the float32 ones (against the loop), ~9 s a case less.
The fp8 cases compute in float16: Triton 3.9's interpreter gets bfloat16 products wrong (a plain 16 x 16 bf16
tl.dot gives values around 1e10), the GPU does not."""

from __future__ import annotations

import pytest
import torch

from pdlaunch.model.moe.fused import fused_moe, moe_reference
from pdlaunch.model.moe.layout import TileConfig
from pdlaunch.model.moe.router import route
from pdlaunch.model.quant import fp8
from tests.model.interpreter import INTERPRET_AT_START, run_interpreter_child

TILE = TileConfig(1 << 30, "triton", 16, 64, 64, 4, 2)


@pytest.fixture
def interpret() -> None:
    pytest.importorskip("triton")
    if not INTERPRET_AT_START:
        pytest.skip("runs in the child of test_interpreter_cases_in_a_subprocess")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("expert_start", [0, 4])
@pytest.mark.parametrize("inter", [128, 96])
def test_interpret_float32_equals_the_reference_loop(interpret: None, tokens: int, expert_start: int,
                                                    inter: int) -> None:
    experts, local, top_k, hidden = 8, 8 - expert_start, 2, 128
    gen = torch.Generator().manual_seed(tokens + inter)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = 0.05 * torch.randn(local, 2 * inter, hidden, generator=gen)
    w2 = 0.05 * torch.randn(local, hidden, inter, generator=gen)
    weights, ids = route(torch.randn(tokens, experts, generator=gen), top_k, True)
    out = fused_moe(x, w13, w2, weights, ids, expert_start, use="triton", tile=TILE)
    want = moe_reference(x, w13, w2, weights, ids, expert_start)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    if expert_start:  # the tokens routed only to the other rank's experts get exactly zero here
        elsewhere = (ids < expert_start).all(dim=1)
        assert torch.equal(out[elsewhere], torch.zeros_like(out[elsewhere]))


@pytest.mark.parametrize("tokens", [1, 64])
def test_interpret_a_down_tile_of_its_own_equals_the_reference_loop(interpret: None, tokens: int) -> None:
    """TileConfig's down_ fields launch the down GEMM with other column and k tiles than the gate/up GEMM
    (narrower and wider than the up's 64 columns, over 4 experts x 96 intermediate columns: masked k steps)."""
    experts, top_k, hidden, inter = 4, 2, 128, 96
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = 0.05 * torch.randn(experts, 2 * inter, hidden, generator=gen)
    w2 = 0.05 * torch.randn(experts, hidden, inter, generator=gen)
    weights, ids = route(torch.randn(tokens, experts, generator=gen), top_k, True)
    want = moe_reference(x, w13, w2, weights, ids, 0)
    for down in (dict(down_block_n=32, down_block_k=16, down_num_stages=1), dict(down_block_n=128, down_block_k=64)):
        tile = TileConfig(1 << 30, "triton", 16, 64, 64, 4, 2, **down)  # type: ignore[arg-type]
        out = fused_moe(x, w13, w2, weights, ids, 0, use="triton", tile=tile)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expert_start", [0, 16])
@pytest.mark.parametrize("fp8_experts", [False, True])
def test_interpret_few_assignments_read_their_experts_from_the_ids(interpret: None, expert_start: int,
                                                                   fp8_experts: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tokens' four assignments for 16 local experts (few_assignments): the kernels take each assignment's
    expert from the routed ids, with no layout launch; assignments to the other rank's experts add nothing."""
    from pdlaunch.model.moe import triton_moe
    from pdlaunch.model.moe.align_kernels import few_assignments

    def no_layout(*args: object) -> None:
        raise AssertionError("align_rows launched for a batch the kernels lay out themselves")

    monkeypatch.setattr(triton_moe, "align_rows", no_layout)
    experts, local, top_k, hidden, inter = 32, 16, 2, 128, 128
    gen = torch.Generator().manual_seed(7 + expert_start)
    x = torch.randn(2, hidden, generator=gen).half()
    w13 = 0.05 * torch.randn(local, 2 * inter, hidden, generator=gen)
    w2 = 0.05 * torch.randn(local, hidden, inter, generator=gen)
    logits = torch.randn(2, experts, generator=gen)
    logits[0, expert_start:expert_start + local] += 10  # token 0 routed here only; token 1 spread
    weights, ids = route(logits, top_k, True)
    assert few_assignments(ids.numel(), local)
    if fp8_experts:
        (w13, s13), (w2, s2) = fp8.quantize_stacked_blocks(w13), fp8.quantize_stacked_blocks(w2)
        out = fused_moe(x, w13, w2, weights, ids, expert_start, use="triton", tile=TILE, scales=(s13, s2))
        w13, w2 = fp8.dequantize_stacked_blocks(w13, s13), fp8.dequantize_stacked_blocks(w2, s2)
    else:
        w13, w2 = w13.half(), w2.half()
        out = fused_moe(x, w13, w2, weights, ids, expert_start, use="triton", tile=TILE)
    want = moe_reference(x.float(), w13.float(), w2.float(), weights, ids, expert_start)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    elsewhere = ((ids < expert_start) | (ids >= expert_start + local)).all(dim=1)
    assert torch.equal(out[elsewhere], torch.zeros_like(out[elsewhere]))


def _fp8_layer(seed: int, tokens: int) -> tuple[torch.Tensor, ...]:
    """A small fp8 MoE layer (8 experts, top-2, hidden 256, width 128) and its routing, seeded: float16 x, the
    block-fp8 experts and their scales, the dequantized float32 experts, routing weights and ids."""
    experts, top_k, hidden, inter = 8, 2, 256, 128
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).half()
    w13, s13 = fp8.quantize_stacked_blocks(0.05 * torch.randn(experts, 2 * inter, hidden, generator=gen))
    w2, s2 = fp8.quantize_stacked_blocks(0.05 * torch.randn(experts, hidden, inter, generator=gen))
    deq13, deq2 = fp8.dequantize_stacked_blocks(w13, s13), fp8.dequantize_stacked_blocks(w2, s2)
    weights, ids = route(torch.randn(tokens, experts, generator=gen), top_k, True)
    return x, w13, s13, w2, s2, deq13, deq2, weights, ids


@pytest.mark.parametrize("tokens", [1, 7])
def test_interpret_fp8_block_experts_equal_the_dequantized_ones(interpret: None, tokens: int) -> None:
    x, w13, s13, w2, s2, deq13, deq2, weights, ids = _fp8_layer(100 + tokens, tokens)
    out = fused_moe(x, w13, w2, weights, ids, use="triton", tile=TILE, scales=(s13, s2))
    same_kernels = fused_moe(x, deq13.half(), deq2.half(), weights, ids, use="triton", tile=TILE)
    assert _rel(out, same_kernels) < 1e-2
    want = moe_reference(x.float(), deq13, deq2, weights, ids)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    # the grouped_mm backend has no fp8 path: asked for, it gives way to these kernels
    assert torch.equal(fused_moe(x, w13, w2, weights, ids, use="grouped_mm", tile=TILE, scales=(s13, s2)), out)


@pytest.mark.parametrize("tokens", [1, 7])
def test_interpret_fp8_activations_w8a8(interpret: None, tokens: int) -> None:
    """fp8 experts with fp8 activations (per token and 128-column group): the per-expert loop on what the kernels
    multiply (dequantized weights; x and the SiLU-and-mul product rounded through fp8 as they quantize them),
    and within fp8's precision of the dequantized weights' result."""
    x, w13, s13, w2, s2, deq13, deq2, weights, ids = _fp8_layer(200 + tokens, tokens)
    w8a8 = TileConfig(1 << 30, "triton", 16, 64, 128, 4, 2, fp8_activations=True)
    out = fused_moe(x, w13, w2, weights, ids, use="triton", tile=w8a8, scales=(s13, s2))
    w8a16 = fused_moe(x, w13, w2, weights, ids, use="triton", tile=TILE, scales=(s13, s2))
    assert not torch.equal(out, w8a16)  # the activations did go through fp8
    assert _rel(out, w8a16) < 6e-2
    xq, xs = fp8.quantize_per_token_group(x)
    x_fp8 = (xq.float().view(tokens, -1, 128) * xs.unsqueeze(2)).view(x.shape)
    want = moe_reference(x_fp8, deq13, deq2, weights, ids)
    assert _rel(out, want) < 6e-2


@pytest.mark.parametrize("tokens", [1, 7])
def test_interpret_fp8_experts_in_float16_products(interpret: None, tokens: int) -> None:
    """fp8 experts with `f16_products`: no activation quantization; float16 activations times the weights widened
    to float16, each 128-wide k block's product scaled by its weight block's scale. Within float16 rounding of the
    per-expert loop on the dequantized weights (closer than the fp8 activations' 6e-2), plain and swapped tiles.
    A gate product past float16's range saturates at 65504 instead of becoming inf."""
    x, w13, s13, w2, s2, deq13, deq2, weights, ids = _fp8_layer(700 + tokens, tokens)
    want = moe_reference(x.float(), deq13, deq2, weights, ids)
    for swap_ab in (False, True):
        tile = TileConfig(1 << 30, "triton", 16, 64, 128, 4, 2, swap_ab=swap_ab, f16_products=True)
        out = fused_moe(x, w13, w2, weights, ids, use="triton", tile=tile, scales=(s13, s2))
        assert _rel(out, want) < 1e-2, swap_ab
    # expert 0's gate and up rows scaled by 2**16 (its block scales): gate and up ~5e4, their product ~1e9, which
    # saturates; its down rows scaled by 2**-6, so that the float16 result itself stays in range
    big13, small2 = s13.clone(), s2.clone()
    big13[0] *= 2.0**16
    small2[0] *= 2.0**-6
    tile = TileConfig(1 << 30, "triton", 16, 64, 128, 4, 2, f16_products=True)
    out = fused_moe(x, w13, w2, weights, ids, use="triton", tile=tile, scales=(big13, small2))
    assert torch.isfinite(out).all()
    untouched = ~(ids == 0).any(dim=1)  # tokens not routed to expert 0 are unchanged
    if untouched.any():
        assert _rel(out[untouched], want[untouched]) < 1e-2


@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize("mode", ["float32", "w8a16", "w8a8"])
def test_interpret_swapped_operand_tiles_equal_the_plain_ones(interpret: None, tokens: int, mode: str) -> None:
    """`swap_ab` tiles multiply weight tile^T @ activations^T (the decode layout on Hopper: the weight tile is
    the warpgroup MMA's 64-row side) and transpose once at the end: the same result as the plain tile."""
    experts, top_k, hidden, inter = 8, 2, 256, 128
    gen = torch.Generator().manual_seed(300 + tokens)
    w13 = 0.05 * torch.randn(experts, 2 * inter, hidden, generator=gen)
    w2 = 0.05 * torch.randn(experts, hidden, inter, generator=gen)
    x = torch.randn(tokens, hidden, generator=gen)
    scales = None
    if mode != "float32":
        x = x.half()
        w13, s13 = fp8.quantize_stacked_blocks(w13)
        w2, s2 = fp8.quantize_stacked_blocks(w2)
        scales = (s13, s2)
    weights, ids = route(torch.randn(tokens, experts, generator=gen), top_k, True)
    plain = TileConfig(1 << 30, "triton", 16, 64, 128, 4, 2, fp8_activations=mode == "w8a8")
    swapped = TileConfig(1 << 30, "triton", 16, 64, 128, 4, 2, fp8_activations=mode == "w8a8", swap_ab=True)
    out = fused_moe(x, w13, w2, weights, ids, use="triton", tile=swapped, scales=scales)
    want = fused_moe(x, w13, w2, weights, ids, use="triton", tile=plain, scales=scales)
    assert _rel(out, want) < (1e-5 if mode == "float32" else 1e-2)


@pytest.mark.parametrize("tokens,top_k,experts,local,block_m", [
    (1, 8, 128, 128, 16), (3, 2, 8, 4, 16), (7, 2, 8, 8, 16), (37, 4, 32, 16, 64), (64, 8, 128, 128, 16),
    (100, 2, 8, 8, 32), (257, 8, 128, 128, 16)])
def test_interpret_align_kernel_equals_the_sorted_layout(interpret: None, tokens: int, top_k: int, experts: int,
                                                         local: int, block_m: int) -> None:
    """The two-launch layout (align_kernels.align_rows, from global ids and the rank's first expert) gives
    layout.align_to_blocks's rows and block experts on the local ids exactly: the few-assignment layout, the
    last or the first `local` experts on the rank (the others' assignments dropped), 16-64-row blocks, and
    2056 rows (over 2048: 128 assignments a program; 4096 took 21 s in the interpreter, this 7)."""
    from pdlaunch.model.moe.align_kernels import align_rows
    from pdlaunch.model.moe.layout import align_to_blocks, local_expert_ids

    _, ids = route(torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens)), top_k, True)
    for start in sorted({0, experts - local}):
        rows, block_expert = align_rows(ids, start, local, block_m)
        want_rows, want_experts = align_to_blocks(local_expert_ids(ids, start, local), local, block_m)
        assert torch.equal(rows, want_rows) and torch.equal(block_expert, want_experts), start


@pytest.mark.slow
def test_interpreter_cases_in_a_subprocess() -> None:
    run_interpreter_child(__file__, "interpret_", "37 passed")


@pytest.mark.parametrize("few", [False, True])
def test_align_kernel_compiles_for_h100(few: bool) -> None:
    """The layout kernels compile for sm_90 with 256 experts (DeepSeek-size routers)."""
    pytest.importorskip("triton.backends.nvidia")
    if INTERPRET_AT_START:
        pytest.skip("the interpreter child decorates interpreted kernels")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pdlaunch.model.moe.align_kernels import _kernels

    kernels = _kernels(False)
    types = {"ids_ptr": "*i64", "rows_ptr": "*i64", "block_expert_ptr": "*i32", "hist_ptr": "*i32"}
    for kernel, constexprs in [(kernels.align_count, {"BLOCK_M": 16, "E_PAD": 256, "CHUNK": 64, "FEW": few}),
                               (kernels.align_place, {"BLOCK_M": 16, "E_PAD": 256, "CHUNK": 64, "CHUNKS_PAD": 64})]:
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        ptx = compiled.asm["ptx"]
        if kernel is kernels.align_place:
            assert "mma" in ptx  # the rank product on tensor cores
        elif few:
            assert "bar.sync" in ptx  # the barrier between the sentinel fill and the rows


@pytest.mark.parametrize("has_scale,a_fp8,block_m,swap_ab,f16", [
    (False, False, 16, False, False), (True, False, 16, False, False), (True, True, 16, False, False),
    (True, True, 64, False, False), (False, False, 16, True, False), (True, False, 16, True, False),
    (True, True, 16, True, False), (True, False, 16, True, True), (True, False, 16, False, True)])
def test_kernels_compile_for_h100_to_tensor_cores(has_scale: bool, a_fp8: bool, block_m: int, swap_ab: bool,
                                                  f16: bool) -> None:
    """Compile (no GPU needed) both kernels for sm_90 and read the PTX: the products run on tensor cores. bf16
    activations: fp8 weight tiles are scaled into bf16 in registers (W8A16). fp8 activations (W8A8): at 64-row
    tiles the products are fp8 x fp8 warpgroup MMAs; at 16 rows (below wgmma's 64) Triton turns both fp8 tiles
    into f16 with one conversion per two elements and runs f16 MMAs, the scales applied to each k block's
    product instead of to every weight. With swap_ab the 64-column weight tile is the MMA's 64-row side and the
    16 rows its n: warpgroup MMAs at decode, fp8 x fp8 (m64n16k32 e4m3) with fp8 activations. f16 (float16
    products): the fp8 weights widen to float16 one instruction per two elements, the products are float16
    MMAs, and no weight is scaled in registers (the up kernel converts nothing to bf16)."""
    pytest.importorskip("triton.backends.nvidia")
    if INTERPRET_AT_START:
        pytest.skip("the interpreter child decorates interpreted kernels")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pdlaunch.model.moe.gemm_kernels import gemm_kernels
    from pdlaunch.model.moe.triton_moe import SCALE_BLOCK

    weight = "*fp8e4nv" if has_scale else "*bf16"
    kernels = gemm_kernels(False)
    for kernel in (kernels.up, kernels.down):
        activations = "*fp8e4nv" if a_fp8 else "*bf16"
        # with f16 the up kernel writes float16 and the down kernel reads it
        types = {"x_ptr": activations, "a_ptr": "*fp16" if f16 else activations, "xs_ptr": "*fp32",
                 "as_ptr": "*fp32", "w_ptr": weight, "s_ptr": "*fp32",
                 "out_ptr": "*fp16" if f16 and kernel is kernels.up else "*bf16", "rows_ptr": "*i64",
                 "block_expert_ptr": "*i32", "weight_ptr": "*fp32"}
        constexprs = {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 128, "PRECISION": "tf32",
                      "HAS_SCALE": has_scale, "SCALE_BLOCK": SCALE_BLOCK, "A_FP8": a_fp8, "SWAP_AB": swap_ab,
                      "MMA": kernels.mma, "PDL": False, "DIRECT": swap_ab, "BLOCK_ROWS": kernels.block_rows,
                      "F16": f16, "TO_F16": kernels.to_f16}
        constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        ptx = compiled.asm["ptx"]
        assert "mma.sync" in ptx or "wgmma" in ptx, kernel.arg_names
        if f16:
            assert "cvt.rn.f16x2.e4m3x2" in ptx
            if kernel is kernels.up:  # (the down kernel rounds its result to the model's bf16 at the end)
                assert "bf16x2" not in ptx and "cvt.rn.bf16.f32" not in ptx
            assert ("wgmma.mma_async" in ptx and "f32.f16.f16" in ptx) if swap_ab else "f32.f16.f16.f32" in ptx
        elif swap_ab:
            assert "wgmma.mma_async" in ptx and "mma.sync" not in ptx
            assert ("m64n16k32.f32.e4m3.e4m3" in ptx) == a_fp8
        elif a_fp8 and block_m >= 64:
            assert "f32.e4m3.e4m3" in ptx  # mma_async (wgmma) on fp8 operands
        elif a_fp8:
            assert "cvt.rn.f16x2.e4m3x2" in ptx and "f32.f16.f16.f32" in ptx
        elif has_scale:
            assert "cvt.rn.bf16x2.f32" in ptx or "cvt.rn.bf16.f32" in ptx  # scaled fp8 -> bf16 in registers
