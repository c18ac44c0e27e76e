"""FP8 kernels on a GPU with FP8 tensor cores (compute capability >= 8.9): GEMMs against references,
the fp8 KV write and paged decode against the torch path, a block-FP8 model against its CPU result.

Error bounds, ||y - ref|| / ||ref||: 1e-2 against float32 on the same quantized operands (the
kernel: fp32 accumulation, bf16 output rounding ~2^-9); 6e-2 against bf16 on the dequantized weight
and unquantized activations (adds e4m3 rounding of the activations, <= 2^-4 per value, ~3% RMS).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdlaunch.model.quant import fp8

pytestmark = pytest.mark.gpu
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="needs a CUDA GPU with FP8 tensor cores (run `make test-gpu` on one)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@needs_fp8
@pytest.mark.parametrize("m", [1, 4, 7, 33, 64, 129, 1024])
@pytest.mark.parametrize("n,k", [(384, 256), (4096, 1024), (200, 384), (28672, 4096), (2048, 4096)])
def test_block_gemm_matches_references(m: int, n: int, k: int) -> None:
    """Up to GEMV_MAX_ROWS rows the weight-only kernel (activations as they are); above, the split GEMM (up to
    SPLIT_MAX_ROWS), the tiled one and cuBLAS's (from CUBLAS_MIN_ROWS on sm_90), on activations quantized per
    128-column group."""
    from pdlaunch.model.quant.block_gemv import GEMV_MAX_ROWS
    from pdlaunch.model.quant.gemm import block_fp8_linear

    w = torch.randn(n, k, device="cuda") * 0.05
    x = torch.randn(m, k, device="cuda").bfloat16()
    wq, ws = fp8.quantize_block(w)
    y = block_fp8_linear(x, wq, ws, torch.bfloat16)
    assert y.shape == (m, n) and torch.isfinite(y).all()
    if m <= GEMV_MAX_ROWS:
        kernel_ref = x.float() @ fp8.dequantize(wq, ws, 128).t()
    else:
        xq, xs = fp8.quantize_per_token_group(x)
        kernel_ref = fp8.dequantize(xq, xs.repeat_interleave(128, 1)) @ fp8.dequantize(wq, ws, 128).t()
    assert _rel(y, kernel_ref) < 1e-2
    assert _rel(y, F.linear(x, fp8.dequantize(wq, ws, 128).bfloat16())) < 6e-2


@needs_fp8
@pytest.mark.parametrize("m", [2, 16, 17, 64])
@pytest.mark.parametrize("n,k,config", [
    (2048, 4096, None),            # the tuned split (Qwen3-30B-A3B o_proj: 32 tiles, 4 ranges on an H200)
    (4096, 14336, None),           # a long K (Llama-3-8B down_proj): from 33 rows 32-row tiles in 4 ranges
    (5120, 2048, (64, 1, 4, 4)),   # one range: the output written directly
    (200, 1152, (64, 4, 4, 3)),    # masked rows of the last tile; 9 blocks in ranges of 3 (the last one short)
    (384, 256, (64, 2, 4, 4)),
])
def test_split_gemm_equals_float32_on_its_quantized_operands(m: int, n: int, k: int,
                                                             config: tuple[int, int, int, int] | None) -> None:
    """The split GEMM on x quantized by quantize_rows, adding the K ranges' float32 partials in order: float32 on
    the same operands within the MMA's rounding, bit-equal from call to call, counters left at zero, and the same
    values replayed from a CUDA graph."""
    from pdlaunch.model import split_counters
    from pdlaunch.model.quant.activations import quantize_rows
    from pdlaunch.model.quant.split_gemm import block_fp8_split_gemm

    gen = torch.Generator(device="cuda").manual_seed(m * n + k)
    wq, ws = fp8.quantize_block(0.05 * torch.randn(n, k, device="cuda", generator=gen))
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    xq, xs = quantize_rows(x, 128)
    want = (xq.float() * xs.repeat_interleave(128, 1)) @ fp8.dequantize(wq, ws, 128).t()
    got = block_fp8_split_gemm(x, wq, ws, torch.float32, config)
    # Hopper's fp8 MMA adds inside each 128-column product with fewer than float32's bits (hence one float32
    # add per block): ~1e-4 relative at 64 rows.
    assert _rel(got, want) < 1e-3
    assert torch.equal(block_fp8_split_gemm(x, wq, ws, torch.float32, config), got)
    assert not split_counters.leftover(x.device), "the adding range must reset its tile's counter"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = block_fp8_split_gemm(x, wq, ws, torch.float32, config)
    for _ in range(2):
        replayed.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, got)
    assert not split_counters.leftover(x.device)


@needs_fp8
def test_quantize_rows_pads_rows_with_zeros_and_lays_scales_out_column_major() -> None:
    from pdlaunch.model.quant.activations import quantize_rows

    x = torch.randn(66, 384, device="cuda").bfloat16()
    q, s = quantize_rows(x, 128)
    qp, sp = quantize_rows(x, 128, pad_rows=4, column_major_scales=True)
    assert qp.shape == (68, 384) and sp.shape == (68, 3) and sp.stride() == (1, 68)
    assert torch.equal(qp[:66].view(torch.uint8), q.view(torch.uint8)) and torch.equal(sp[:66], s)
    assert not qp[66:].float().any()


@needs_fp8
@pytest.mark.parametrize("m", [65, 66, 127, 4097])
@pytest.mark.parametrize("n,k", [(208, 512), (384, 1536), (2048, 4096)])
def test_cublas_block_gemm_equals_float32_on_its_quantized_operands(m: int, n: int, k: int) -> None:
    """torch._scaled_mm with 1x128 x 128x128 block scales, where the device has it (sm_90): row counts that are not
    a multiple of 4 padded and cut back, float32 on the same quantized operands within the MMA's rounding, the
    path block_fp8_linear takes from CUBLAS_MIN_ROWS rows, and the same values replayed from a CUDA graph."""
    from pdlaunch.model.quant.activations import quantize_rows
    from pdlaunch.model.quant.cublas_gemm import cublas_block_linear, cublas_block_scaled
    from pdlaunch.model.quant.gemm import CUBLAS_MIN_ROWS, block_fp8_linear

    if not cublas_block_scaled(torch.device("cuda")):
        pytest.skip("torch._scaled_mm has no block scales on this GPU (cuBLAS has them on sm_90)")
    gen = torch.Generator(device="cuda").manual_seed(m + n + k)
    wq, ws = fp8.quantize_block(0.05 * torch.randn(n, k, device="cuda", generator=gen))
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    xq, xs = quantize_rows(x, 128)
    want = (xq.float() * xs.repeat_interleave(128, 1)) @ fp8.dequantize(wq, ws, 128).t()
    got = cublas_block_linear(x, wq, ws, torch.float32)
    assert got.shape == (m, n) and got.is_contiguous()
    assert torch.isfinite(got).all()
    assert _rel(got, want) < 1e-3
    assert m >= CUBLAS_MIN_ROWS and torch.equal(block_fp8_linear(x, wq, ws, torch.float32), got)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = block_fp8_linear(x, wq, ws, torch.float32)
    replayed.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, got)


@needs_fp8
@pytest.mark.parametrize("m", [16, 17, 33, 64])
def test_large_weights_take_cublas_from_17_rows(m: int) -> None:
    """A weight of CUBLAS_LARGE_WEIGHT elements (gate_up-sized) runs cuBLAS's GEMM from CUBLAS_LARGE_MIN_ROWS rows
    (bit-equal to cublas_block_linear), the Triton tiled GEMM below; on a device LARGE_WEIGHT_TILED names (the
    H100), the tiled GEMM in that config from LARGE_TILED_MIN_ROWS to SPLIT_MAX_ROWS rows."""
    from pdlaunch.model.quant.cublas_gemm import cublas_block_linear, cublas_block_scaled
    from pdlaunch.model.quant.gemm import (
        CUBLAS_LARGE_MIN_ROWS,
        CUBLAS_LARGE_WEIGHT,
        LARGE_TILED_MIN_ROWS,
        LARGE_WEIGHT_TILED,
        _config,
        block_fp8_linear,
    )
    from pdlaunch.model.quant.split_gemm import SPLIT_MAX_ROWS

    if not cublas_block_scaled(torch.device("cuda")):
        pytest.skip("torch._scaled_mm has no block scales on this GPU (cuBLAS has them on sm_90)")
    n, k = CUBLAS_LARGE_WEIGHT // 4096, 4096
    gen = torch.Generator(device="cuda").manual_seed(m)
    wq, ws = fp8.quantize_block(0.05 * torch.randn(n, k, device="cuda", generator=gen))
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    name = torch.cuda.get_device_name()
    tiled = next((c for key, c in LARGE_WEIGHT_TILED.items() if key in name), None)
    if tiled is not None and LARGE_TILED_MIN_ROWS <= m <= SPLIT_MAX_ROWS:  # this device: its tiles there
        want = block_fp8_linear(x, wq, ws, torch.bfloat16, config=tiled)
    else:
        want = (cublas_block_linear if m >= CUBLAS_LARGE_MIN_ROWS else
                lambda *a: block_fp8_linear(*a, config=_config(m)))(x, wq, ws, torch.bfloat16)
    assert torch.equal(block_fp8_linear(x, wq, ws, torch.bfloat16), want)


@needs_fp8
@pytest.mark.parametrize("m", [1, 33, 1024])
def test_channel_scaled_mm_matches_references(m: int) -> None:
    from pdlaunch.model.quant.activations import quantize_rows

    w = torch.randn(1536, 512, device="cuda") * 0.05
    x = torch.randn(m, 512, device="cuda").bfloat16()
    wq, ws = fp8.quantize_per_channel(w)
    xq, xs = quantize_rows(x, None)
    ref_q, ref_s = fp8.quantize_per_token(x)
    assert torch.equal(xq.view(torch.uint8), ref_q.view(torch.uint8)) and torch.allclose(xs, ref_s)
    y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.reshape(1, -1), out_dtype=torch.bfloat16)
    assert _rel(y, (xq.float() * xs) @ fp8.dequantize(wq, ws).t()) < 1e-2
    assert _rel(y, F.linear(x, fp8.dequantize(wq, ws).bfloat16())) < 6e-2


@needs_fp8
def test_fp8_kv_kernels_match_torch_path() -> None:
    """The fused fp8 write and the Triton paged decode (scales folded in) against the torch path."""
    from pdlaunch.model.fused_ops import write_kv
    from pdlaunch.model.fused_reference import write_kv_torch
    from pdlaunch.model.triton_decode import paged_decode

    torch.manual_seed(1)
    blocks, layers, bs, hkv, d, hq = 16, 2, 16, 2, 128, 8
    cache = torch.zeros(blocks, layers, 2, bs, hkv, d, dtype=fp8.FP8_DTYPE, device="cuda")
    ref = torch.zeros_like(cache)
    tokens = 40
    k = torch.randn(tokens, hkv, d, device="cuda").bfloat16()
    v = torch.randn(tokens, hkv, d, device="cuda").bfloat16()
    slots = torch.arange(tokens, device="cuda") + 16
    scales = (0.37, 0.0123)  # not powers of two: the kernel's division must round as torch's does
    write_kv(cache, k, v, slots, 1, scales)
    write_kv_torch(ref, k, v, slots, 1, scales)
    assert torch.equal(cache.view(torch.uint8), ref.view(torch.uint8))
    q = torch.randn(1, hq, d, device="cuda").bfloat16()
    table = torch.tensor([[1, 2, 3, 0]], device="cuda")
    out = paged_decode(q, cache, 1, torch.tensor([0], device="cuda"), table, torch.tensor([tokens], device="cuda"),
                       None, d**-0.5, kv_scales=scales)
    keys = (cache[1:4, 1, 0].reshape(-1, hkv, d)[:tokens].float() * scales[0]).bfloat16()
    vals = (cache[1:4, 1, 1].reshape(-1, hkv, d)[:tokens].float() * scales[1]).bfloat16()
    expect = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                                            vals.transpose(0, 1).unsqueeze(0), scale=d**-0.5, enable_gqa=True)
    assert _rel(out, expect[0].transpose(0, 1)) < 1e-2


@needs_fp8
def test_fp8_paged_decode_at_a_batch_that_fills_the_gpu() -> None:
    """24 sequences x 8 KV heads (more programs than SMs: fp8 takes 128-token tiles where bf16 takes 64)
    against float64 attention over the dequantized keys and values."""
    from pdlaunch.model.triton_decode import paged_decode

    gen = torch.Generator(device="cuda").manual_seed(3)
    seqs, hkv, hq, d, bs, ctx = 24, 8, 32, 128, 16, 300
    per_seq = -(-ctx // bs)
    cache = torch.randn(seqs * per_seq + 1, 1, 2, bs, hkv, d, device="cuda", generator=gen).to(fp8.FP8_DTYPE)
    table = torch.randperm(cache.shape[0], device="cuda", generator=gen)[:seqs * per_seq].view(seqs, per_seq)
    q = torch.randn(seqs, hq, d, device="cuda", generator=gen).bfloat16()
    lens = torch.full((seqs,), ctx, device="cuda")
    scales = (0.5, 0.25)
    out = paged_decode(q, cache, 0, torch.arange(seqs, device="cuda"), table, lens, None, d**-0.5, kv_scales=scales)
    pos = torch.arange(ctx, device="cuda")
    rows = table[:, pos // bs]
    k = cache[rows, 0, 0, pos % bs].double().repeat_interleave(hq // hkv, 2) * scales[0]
    v = cache[rows, 0, 1, pos % bs].double().repeat_interleave(hq // hkv, 2) * scales[1]
    s = torch.einsum("shd,schd->shc", q.double(), k) * d**-0.5
    want = torch.einsum("shc,schd->shd", s.softmax(-1), v)
    assert _rel(out, want) < 1e-2


@needs_fp8
@pytest.mark.parametrize("qk", ["f16", "bf16"])
def test_fp8_paged_decode_key_product_in_either_precision(qk: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key product in float16 (the default over an fp8 cache) or bf16 (PDLAUNCH_FP8_QK=bf16): both within the
    same bound of float64 attention, also for a query past float16's range, which the float16 product clamps
    (to 65504) instead of turning into inf and NaN."""
    from pdlaunch.model.triton_decode import paged_decode

    monkeypatch.setenv("PDLAUNCH_FP8_QK", qk)
    gen = torch.Generator(device="cuda").manual_seed(4)
    seqs, hkv, hq, d, bs, ctx = 64, 4, 32, 128, 16, 700
    per_seq = -(-ctx // bs)
    cache = (torch.randn(seqs * per_seq, 1, 2, bs, hkv, d, device="cuda", generator=gen) * 0.3).to(fp8.FP8_DTYPE)
    table = torch.randperm(cache.shape[0], device="cuda", generator=gen)[:seqs * per_seq].view(seqs, per_seq)
    q = torch.randn(seqs, hq, d, device="cuda", generator=gen).bfloat16()
    q[5, 3, 7] = 1e5  # one query element past float16's largest finite value
    lens = torch.randint(1, ctx + 1, (seqs,), device="cuda", generator=gen)
    out = paged_decode(q, cache, 0, torch.arange(seqs, device="cuda"), table, lens, None, d**-0.5)
    assert out.isfinite().all()
    query = q.double().clamp(-65504, 65504) if qk == "f16" else q.double()
    for s in range(seqs):
        n = int(lens[s])
        pos = torch.arange(n, device="cuda")
        rows = table[s, pos // bs]
        k = cache[rows, 0, 0, pos % bs].double().repeat_interleave(hq // hkv, 1)  # [n, hq, d]
        v = cache[rows, 0, 1, pos % bs].double().repeat_interleave(hq // hkv, 1)
        want = torch.einsum("hn,nhd->hd", (torch.einsum("hd,nhd->hn", query[s], k) * d**-0.5).softmax(-1), v)
        assert _rel(out[s], want) < 1e-2, s
