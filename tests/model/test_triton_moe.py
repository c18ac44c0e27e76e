"""The Triton MoE kernels (model/moe/triton_moe.py) without a GPU: on CPU tensors under TRITON_INTERPRET=1 (in a
child pytest started with the variable set, as in test_triton_decode.py) against the per-expert reference loop,
and compiled for sm_90 to read the PTX. The CUDA cases (graphs, the tile files, speed) are in test_moe_gpu.py
and tests/quant/test_fp8_moe_gpu.py.

Interpreter cases: float32 at 1, 7 and 64 tokens, all experts here and half of them (expert parallel: the other
rank's assignments add nothing), an expert width that is not a multiple of the column tile (masked columns);
fp8 experts with 128x128 block scales equal the same kernels on the dequantized 16-bit weights and the float32
loop within 16-bit tolerance. The interpreter's fp8 case computes in float16: Triton 3.9's interpreter gets
bfloat16 products wrong (a plain 16 x 16 bf16 tl.dot gives values around 1e10), the GPU does not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdlaunch.model.moe.block import route
from pdlaunch.model.moe.fused import fused_moe, moe_reference
from pdlaunch.model.moe.layout import TileConfig
from pdlaunch.model.quant import fp8

INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET") == "1"
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


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_interpret_fp8_block_experts_equal_the_dequantized_ones(interpret: None, tokens: int) -> None:
    experts, top_k, hidden, inter = 8, 2, 256, 128
    gen = torch.Generator().manual_seed(100 + tokens)
    x = torch.randn(tokens, hidden, generator=gen).half()
    w13, s13 = fp8.quantize_stacked_blocks(0.05 * torch.randn(experts, 2 * inter, hidden, generator=gen))
    w2, s2 = fp8.quantize_stacked_blocks(0.05 * torch.randn(experts, hidden, inter, generator=gen))
    deq13 = fp8.dequantize_stacked_blocks(w13, s13)
    deq2 = fp8.dequantize_stacked_blocks(w2, s2)
    weights, ids = route(torch.randn(tokens, experts, generator=gen), top_k, True)
    out = fused_moe(x, w13, w2, weights, ids, use="triton", tile=TILE, scales=(s13, s2))
    same_kernels = fused_moe(x, deq13.half(), deq2.half(), weights, ids, use="triton", tile=TILE)
    assert _rel(out, same_kernels) < 1e-2
    want = moe_reference(x.float(), deq13, deq2, weights, ids)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    # the grouped_mm backend has no fp8 path: asked for, it gives way to these kernels
    assert torch.equal(fused_moe(x, w13, w2, weights, ids, use="grouped_mm", tile=TILE, scales=(s13, s2)), out)


@pytest.mark.slow
def test_interpreter_cases_in_a_subprocess() -> None:
    pytest.importorskip("triton")
    if INTERPRET_AT_START:
        pytest.skip("this is the child")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpret_"]
    child = subprocess.run(command, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert "15 passed" in child.stdout and "runs in the child" not in child.stdout, child.stdout[-3000:]


@pytest.mark.parametrize("has_scale", [False, True])
def test_kernels_compile_for_h100_to_tensor_cores(has_scale: bool) -> None:
    """Compile (no GPU needed) both kernels at the Qwen3-30B-A3B expert shape with bf16 activations, from bf16
    or fp8 (e4m3) weights, and read the PTX: the products run on tensor cores (mma), the fp8 tiles are
    converted in registers."""
    pytest.importorskip("triton.backends.nvidia")
    if INTERPRET_AT_START:
        pytest.skip("the interpreter child decorates interpreted kernels")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pdlaunch.model.moe.triton_moe import SCALE_BLOCK, _kernels

    weight = "*fp8e4nv" if has_scale else "*bf16"
    kernels = _kernels(False)
    for kernel in (kernels.up, kernels.down):
        types = {"x_ptr": "*bf16", "a_ptr": "*bf16", "w_ptr": weight, "s_ptr": "*fp32", "out_ptr": "*bf16",
                 "rows_ptr": "*i64", "block_expert_ptr": "*i32", "weight_ptr": "*fp32"}
        constexprs = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "PRECISION": "tf32", "HAS_SCALE": has_scale,
                      "SCALE_BLOCK": SCALE_BLOCK}
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        ptx = compiled.asm["ptx"]
        assert "mma.sync" in ptx or "wgmma" in ptx, kernel.arg_names
        if has_scale:
            assert "cvt.rn.bf16x2.f32" in ptx or "cvt.rn.bf16.f32" in ptx  # scaled fp8 -> bf16 in registers
