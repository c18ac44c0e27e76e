"""Fused ops: Triton kernels == torch references (bit for bit where the spec says so), and the
references == the model code they replace.

Kernel cases run on "cuda" (gpu marker) and on CPU tensors under TRITON_INTERPRET=1 ("interpret",
skipped without triton). Triton decorates its own library helpers (tl.sum) when it is first
imported, so the interpreter cases need the variable set before any import of triton: they run in
a child pytest started with it (test_interpreter_cases_in_a_subprocess). In the kernel cases the
torch references inside the ops' modules are replaced by a function that fails, so a silent fallback
cannot compare the reference with itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pdlaunch.errors import PdlaunchError
from pdlaunch.model import fused_kernels, fused_norm, fused_ops, fused_rotary
from pdlaunch.model.attention import paged_attention
from pdlaunch.model.attention_metadata import AttentionMetadata
from pdlaunch.model.attention_plan import build_group_plan
from pdlaunch.model.fused_reference import (
    apply_rotary_torch,
    fused_add_rms_norm_torch,
    rms_norm_torch,
    rotary_cos_sin_torch,
    silu_and_mul_torch,
    write_kv_torch,
)
from pdlaunch.model.fused_rotary import rotary_cos_sin
from pdlaunch.model.rms_norm import RMSNorm
from pdlaunch.model.rope_config import RopeScaling
from pdlaunch.model.rotary import RotaryEmbedding, compute_inv_freq
from tests.model.interpreter import INTERPRET_AT_START, run_interpreter_child

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Each torch reference, with the module whose ops fall back to it (where the kernel cases replace it).
REFERENCES = [(fused_norm, "rms_norm_torch"), (fused_norm, "fused_add_rms_norm_torch"),
              (fused_rotary, "apply_rotary_torch"), (fused_ops, "silu_and_mul_torch"), (fused_ops, "write_kv_torch"),
              (fused_rotary, "rotary_cos_sin_torch")]
# Set when this process started as the interpreter child (before torch or triton were imported).
LLAMA3_SCALING = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8192)


def _interpreter_rounds_bf16_to_nearest_even(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton 3.x interpreter truncates fp32 -> bf16 (create_fp_trunc ignores rounding), while
    compiled kernels (cvt.rn.bf16.f32) and torch round to nearest even: make the emulator do that."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_fp_trunc

    def fp_trunc(self: object, src: interpreter.TensorHandle, dst_type: tl.dtype) -> interpreter.TensorHandle:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fp_trunc", fp_trunc)


def _forbid(name: str):  # noqa: ANN202
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} ran: the kernel case fell back to the torch reference")
    return fail


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "interpret"])
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the Triton kernels run; set up before the first kernel is built (lazily, per mode)."""
    pytest.importorskip("triton")
    monkeypatch.delenv("PDLAUNCH_FUSED_OPS", raising=False)
    if request.param == "interpret":
        if not INTERPRET_AT_START:
            pytest.skip("runs in the child of test_interpreter_cases_in_a_subprocess")
        _interpreter_rounds_bf16_to_nearest_even(monkeypatch)
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for module, name in REFERENCES:
        monkeypatch.setattr(module, name, _forbid(name))
    return "cuda" if request.param == "cuda" else "cpu"


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between same-dtype tensors (values of equal sign)."""
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return (a.view(ints).long() - b.view(ints).long()).abs()


def _assert_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    bad = (got.cpu() != want.cpu()).sum().item()
    assert bad == 0, f"{bad} of {want.numel()} elements differ (max {_ulps(got.cpu(), want.cpu()).max()} ulp)"


def _assert_rms_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The row sum of squares may be added in another order: half-precision results then differ
    rarely by one ulp; fp32 results (no rounding step after the scale) by a few ulp per row, more
    on CUDA where torch's rsqrt is rsqrtf (2 ulp) and the kernel's a correctly rounded 1/sqrt."""
    ulps = _ulps(got.cpu(), want.cpu())
    if want.dtype == torch.float32:
        assert ulps.max() <= 8, f"max {ulps.max()} ulp"
        return
    assert ulps.max() <= 1, f"max {ulps.max()} ulp"
    assert (ulps > 0).float().mean() < 0.005, f"{(ulps > 0).sum()} of {ulps.numel()} elements differ"


def _qkv_views(tokens: int, hq: int, hkv: int, head_dim: int, dtype: torch.dtype, device: str,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v as the attention layer gets them: strided views of one qkv matmul output."""
    qkv = torch.randn(tokens, (hq + 2 * hkv) * head_dim, dtype=dtype, device=device)
    q, k, v = qkv.split([hq * head_dim, hkv * head_dim, hkv * head_dim], dim=-1)
    return q.view(tokens, hq, head_dim), k.view(tokens, hkv, head_dim), v.view(tokens, hkv, head_dim)


# ---- kernels vs references -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(3, 96), (4, 200)])
def test_rms_norm_kernel_matches_reference(device: str, dtype: torch.dtype, tokens: int, hidden: int) -> None:
    torch.manual_seed(hidden)
    wide = torch.randn(tokens, hidden + 16, dtype=dtype, device=device) * 3
    x = wide[:, 8:8 + hidden]  # a strided view
    weight = torch.randn(hidden, dtype=dtype, device=device)
    _assert_rms_close(fused_norm.rms_norm(x, weight, 1e-5), rms_norm_torch(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_sums_partial_rows_first(device: str, dtype: torch.dtype) -> None:
    """[T, k, H] partial rows (an MoE layer's weighted expert outputs, unsummed) are added over k, rounded once,
    then added to the residual: the values of summing them in torch first."""
    torch.manual_seed(2)
    rows = torch.randn(5, 8, 96, dtype=dtype, device=device)
    residual = torch.randn(5, 96, dtype=dtype, device=device) * 4
    weight = torch.randn(96, dtype=dtype, device=device)
    y, new_residual = fused_norm.fused_add_rms_norm(rows, residual, weight, 1e-6)
    want_residual = rows.sum(dim=1) + residual
    if dtype == torch.float32:  # eight float32 values added in another order than torch's: not bit-equal
        torch.testing.assert_close(new_residual, want_residual, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, rms_norm_torch(new_residual, weight, 1e-6), rtol=1e-5, atol=1e-5)
        return
    _assert_equal(new_residual, want_residual)  # 16-bit values of this range add up exactly in float32
    _assert_rms_close(y, rms_norm_torch(want_residual, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_kernel_matches_reference(device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    x = torch.randn(5, 96, dtype=dtype, device=device)
    residual = torch.randn(5, 96, dtype=dtype, device=device) * 4
    weight = torch.randn(96, dtype=dtype, device=device)
    y, new_residual = fused_norm.fused_add_rms_norm(x, residual, weight, 1e-6)
    want_residual = x + residual
    want_y = rms_norm_torch(want_residual, weight, 1e-6)
    _assert_equal(new_residual, want_residual)
    _assert_rms_close(y, want_y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_apply_rotary_kernel_matches_reference_bit_for_bit(device: str, dtype: torch.dtype, head_dim: int) -> None:
    torch.manual_seed(head_dim)
    q, k, _ = _qkv_views(5, 8, 2, head_dim, dtype, device)
    positions = torch.tensor([0, 1, 17, 4095, 131000], device=device)
    inv_freq = compute_inv_freq(head_dim, 500000.0, LLAMA3_SCALING, 131072).to(device)
    cos, sin = rotary_cos_sin(positions, inv_freq, dtype)
    q_out, k_out = fused_rotary.apply_rotary(q, k, cos, sin)
    want_q, want_k = apply_rotary_torch(q, k, cos, sin)
    _assert_equal(q_out, want_q)
    _assert_equal(k_out, want_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,theta,scaling", [(128, 500000.0, LLAMA3_SCALING), (64, 10000.0, None),
                                                    (80, 1000000.0, None)])
def test_rotary_cos_sin_kernel_matches_reference(device: str, dtype: torch.dtype, head_dim: int, theta: float,
                                                 scaling: RopeScaling | None) -> None:
    """One kernel for a step's cos/sin; on CUDA bit for bit torch's seven ops (cosf/sinf both), every position to
    128k; the interpreter's numpy cos/sin may differ from torch's CPU ones in the last float32 bit."""
    step = 37 if device == "cuda" else 4099  # the interpreter runs a program at a time
    positions = torch.cat([torch.arange(0, 131072, step), torch.tensor([131071])]).to(device)
    inv_freq = compute_inv_freq(head_dim, theta, scaling, 131072).to(device)
    cos, sin = rotary_cos_sin(positions, inv_freq, dtype)
    want_cos, want_sin = rotary_cos_sin_torch(positions, inv_freq, dtype)
    assert cos.shape == sin.shape == (positions.shape[0], head_dim) and cos.dtype == sin.dtype == dtype
    if device == "cuda":
        _assert_equal(cos, want_cos)
        _assert_equal(sin, want_sin)
    else:
        torch.testing.assert_close(cos, want_cos, rtol=0, atol=2e-6 if dtype == torch.float32 else 1e-2)
        torch.testing.assert_close(sin, want_sin, rtol=0, atol=2e-6 if dtype == torch.float32 else 1e-2)
    empty = rotary_cos_sin(positions[:0], inv_freq, dtype)
    assert empty[0].shape == empty[1].shape == (0, head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [75, 1100])
def test_silu_and_mul_kernel_matches_reference(device: str, dtype: torch.dtype, inter: int) -> None:
    torch.manual_seed(inter)
    wide = torch.randn(3, 2 * inter + 6, dtype=dtype, device=device) * 4
    gate_up = wide[:, 3:3 + 2 * inter]  # a strided view; the second block (inter > 1024) is partial
    got, want = fused_ops.silu_and_mul(gate_up), silu_and_mul_torch(gate_up)
    if device == "cuda":
        _assert_equal(got, want)  # libdevice expf is the expf of torch's CUDA silu
        return
    # The interpreter's exp is numpy's, torch's CPU exp is SLEEF's (or libm's for tail elements):
    # both accurate, not always the same float, so results differ by a few fp32 ulp, and after
    # rounding to bf16/fp16 rarely by one ulp.
    ulps = _ulps(got, want)
    assert ulps.max() <= (4 if dtype == torch.float32 else 1), f"max {ulps.max()} ulp"
    if dtype != torch.float32:
        assert (ulps > 0).float().mean() < 0.005


@pytest.mark.parametrize("cache_dtype,kv_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                                  (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("layer_in_group", [0, 2])
def test_write_kv_kernel_matches_reference(device: str, cache_dtype: torch.dtype, kv_dtype: torch.dtype,
                                           layer_in_group: int) -> None:
    torch.manual_seed(layer_in_group)
    num_blocks, layers, block_size, hkv, head_dim = 7, 3, 4, 2, 64
    cache = torch.randn(num_blocks, layers, 2, block_size, hkv, head_dim, dtype=cache_dtype, device=device)
    before, want = cache.clone(), cache.clone()
    _, k, v = _qkv_views(6, 8, hkv, head_dim, kv_dtype, device)
    blocks = torch.randperm(num_blocks)[:6]
    offsets = torch.randint(0, block_size, (6,))
    slots = (blocks * block_size + offsets).to(device)
    slots[1] = -1
    slots[4] = -1
    fused_ops.write_kv(cache, k, v, slots, layer_in_group)
    write_kv_torch(want, k, v, slots, layer_in_group)
    _assert_equal(cache, want)
    assert not torch.equal(cache, before)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                               (torch.bfloat16, torch.float8_e4m3fn)])
@pytest.mark.parametrize("head_norm", [False, True])
def test_rotary_write_kv_kernel_equals_norm_rotary_and_write_in_turn(device: str, dtype: torch.dtype,
                                                                     cache_dtype: torch.dtype, head_norm: bool) -> None:
    """The attention layer's one kernel (rotary_write_kv): per-head RMSNorm (Qwen3) when asked, rotary, and
    the rotated k with v written to their slots (slot -1 skipped), against the references in turn."""
    if device == "cpu" and cache_dtype == torch.float8_e4m3fn:
        pytest.skip("the interpreter's float32 -> e4m3 conversion does not round as the GPU and torch do")
    torch.manual_seed(int(head_norm))
    head_dim, hq, hkv, tokens, layer = 64, 8, 2, 5, 1
    q, k, v = _qkv_views(tokens, hq, hkv, head_dim, dtype, device)
    inv_freq = compute_inv_freq(head_dim, 10000.0, None, 4096).to(device)
    cos, sin = rotary_cos_sin(torch.tensor([0, 3, 17, 900, 2], device=device), inv_freq, dtype)
    norm = None
    if head_norm:
        norm = (torch.randn(head_dim, dtype=dtype, device=device), torch.randn(head_dim, dtype=dtype, device=device),
                1e-6)
    cache = torch.zeros(7, 3, 2, 4, hkv, head_dim, dtype=cache_dtype, device=device)
    want_cache = cache.clone()
    slots = torch.tensor([3, -1, 9, 20, 27], device=device)
    scales = (0.5, 2.0) if cache_dtype == torch.float8_e4m3fn else (1.0, 1.0)
    got_q, got_k = fused_rotary.rotary_write_kv(q, k, v, cos, sin, cache, slots, layer, scales, norm)
    want_q, want_k = q, k
    if norm is not None:
        want_q = rms_norm_torch(q.reshape(-1, head_dim), norm[0], norm[2]).view(tokens, hq, head_dim)
        want_k = rms_norm_torch(k.reshape(-1, head_dim), norm[1], norm[2]).view(tokens, hkv, head_dim)
    want_q, want_k = apply_rotary_torch(want_q, want_k, cos, sin)
    write_kv_torch(want_cache, want_k, v, slots, layer, scales)
    check = _assert_equal
    if head_norm:  # the row sums may add in another order; float32 rotation then amplifies the last bits
        def check(got: torch.Tensor, want: torch.Tensor) -> None:
            if want.dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            else:
                _assert_rms_close(got, want)
    check(got_q, want_q)
    check(got_k, want_k)
    if cache_dtype == torch.float8_e4m3fn:
        assert (got_k == want_k).all(), "fp8: the compared cache bytes need the same rotated k"
        _assert_equal(cache.view(torch.uint8), want_cache.view(torch.uint8))
    else:
        check(cache, want_cache)
    assert cache.float().abs().sum() > 0  # (slot -1 skipped: the reference skips it too)


def _argmax_cases(vocab: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Rows of random values, and rows with what an argmax must settle: ties inside a chunk and across chunks
    (the first column wins), NaNs (the first NaN wins, as in torch), all -inf, and the largest value last."""
    rows = [torch.randn(vocab), torch.randn(vocab)]
    tie = torch.zeros(vocab)
    tie[[vocab // 2, vocab - 1, vocab // 3]] = 3.0
    nan = torch.randn(vocab)
    nan[[vocab - 1, vocab // 2]] = float("nan")
    last = torch.randn(vocab)
    last[-1] = 100.0
    rows += [tie, nan, torch.full((vocab,), float("-inf")), last]
    return torch.stack(rows).to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 2047, 2048, 6001, 128256])
def test_argmax_rows_is_torchs_argmax(device: str, dtype: torch.dtype, vocab: int,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    logits = _argmax_cases(vocab, dtype, device)
    wider = torch.cat([logits, logits[:, :5]], dim=1)[:, :vocab]  # rows strided past their width
    want, want_wider = logits.argmax(dim=-1), wider.argmax(dim=-1)
    monkeypatch.setattr(torch.Tensor, "argmax", _forbid("Tensor.argmax"))  # the kernels, not a fallback
    _assert_equal(fused_ops.argmax_rows(logits), want)
    _assert_equal(fused_ops.argmax_rows(wider), want_wider)


def test_argmax_rows_falls_back_to_torch_off_the_kernels() -> None:
    """CPU tensors without the interpreter, and columns that are not contiguous, take torch's argmax."""
    logits = _argmax_cases(3000, torch.float32, "cpu")
    _assert_equal(fused_ops.argmax_rows(logits), logits.argmax(dim=-1))
    _assert_equal(fused_ops.argmax_rows(logits.t().contiguous().t()), logits.argmax(dim=-1))
    _assert_equal(fused_ops.argmax_rows(logits[:0]), logits[:0].argmax(dim=-1))


@pytest.mark.slow
def test_interpreter_cases_in_a_subprocess() -> None:
    run_interpreter_child(__file__, "interpret", timeout=240)


def test_interpret_mode_builds_interpreted_kernels(device: str) -> None:
    if device == "cuda":
        pytest.skip("interpreter check")
    kernels = fused_kernels.kernels_for(fused_ops.interpret_mode())
    assert type(kernels.rms_norm).__name__ == "InterpretedFunction"
    assert fused_ops.use_triton(torch.zeros(1)) and fused_ops.fused_available(torch.zeros(1))
    assert not fused_ops.fused_available(torch.zeros(1, dtype=torch.float64))  # no kernel: the reference


@pytest.mark.gpu  # no GPU needed, but Triton's CUDA backend: make test-gpu is where it is installed
def test_kernels_compile_for_h100_with_the_rounding_the_spec_needs() -> None:
    """Compile (no GPU needed) for sm_90 at Llama-8B sizes and read the PTX: correctly rounded
    division/sqrt, libdevice expf, and no FMA contraction in rotary's a*cos + b*sin."""
    pytest.importorskip("triton.backends.nvidia")
    if INTERPRET_AT_START:
        pytest.skip("the interpreter child decorates interpreted kernels")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = fused_kernels.kernels_for(False)

    def ptx(fn: object, types: dict[str, str], constexprs: dict[str, object]) -> str:
        signature = {name: "constexpr" if name in constexprs else types.get(name, "i32")
                     for name in fn.arg_names}  # type: ignore[attr-defined]
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
        return compiled.asm["ptx"]

    bf16 = "*bf16"
    fp8_out = {"QUANT": False, "QUANTIZE": kernels.quantize_groups, "FMAX": 448.0, "INV_FMAX": 1 / 448}
    for quant in (False, True):  # the norm's output in bf16, or in fp8 for a block-FP8 layer (and its scales)
        out = "*fp8e4nv" if quant else bf16
        rms = ptx(kernels.rms_norm, {"x_ptr": bf16, "r_ptr": bf16, "w_ptr": bf16, "y_ptr": out, "res_out_ptr": out,
                                     "s_ptr": "*fp32", "eps": "fp32"},
                  {"ADD_RESIDUAL": True, "BLOCK_H": 4096, "PARTS": 1, "PDL": False, "RELEASE": False,
                   **fp8_out, "QUANT": quant, "NORMALIZE": kernels.normalize})
        assert "sqrt.rn.f32" in rms and "div.rn.f32" in rms and "div.full" not in rms and "rsqrt" not in rms
    pointers = ["q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "q_out_ptr", "k_out_ptr", "qw_ptr", "kw_ptr", "v_ptr"]
    for norm, write in ((False, False), (True, True)):  # rotary alone; Qwen3's norm, rotary and the KV write
        rotary = ptx(kernels.rotary, {**dict.fromkeys(pointers, bf16), "cache_ptr": "*fp8e4nv", "slot_ptr": "*i64",
                                      "eps": "fp32", "k_scale": "fp32", "v_scale": "fp32", "block_stride": "i64",
                                      "layer_offset": "i64"},
                     {"D": 128, "D_PAD": 128, "HQ_PAD": 32, "HKV_PAD": 8, "ROTATE": kernels.rotate_heads, "NORM": norm,
                      "WRITE_KV": write, "FP8": write, "PDL": False})
        # the rounding to bf16 is round-to-nearest, one value or a packed pair (Triton 3.6 packs them)
        assert "fma" not in rotary and ("cvt.rn.bf16.f32" in rotary or "cvt.rn.bf16x2.f32" in rotary)
        assert ("sqrt.rn.f32" in rotary and "div.rn.f32" in rotary) == norm and "div.full" not in rotary
    for quant in (False, True):
        silu = ptx(kernels.silu_and_mul, {"x_ptr": bf16, "out_ptr": "*fp8e4nv" if quant else bf16, "s_ptr": "*fp32"},
                   {"BLOCK": 1024, "LIBDEVICE_EXP": True, "PDL": False, **fp8_out, "QUANT": quant})
        assert "div.rn.f32" in silu and "div.full" not in silu and "fma.rm" in silu  # expf's range reduction
    for cache, fp8 in ((bf16, False), ("*fp8e4nv", True)):  # a bf16 cache, and an fp8 one storing x / scale
        write = ptx(kernels.write_kv, {"cache_ptr": cache, "k_ptr": bf16, "v_ptr": bf16, "slot_ptr": "*i64",
                                       "block_stride": "i64", "layer_offset": "i64", "k_scale": "fp32",
                                       "v_scale": "fp32"}, {"D": 128, "D_PAD": 128, "H_PAD": 8, "FP8": fp8,
                                                             "PDL": False})
        # an fp8 store divides as torch does, correctly rounded (tests/quant/test_fp8_gpu.py compares the bytes;
        # the interpreter cannot: its float32 -> e4m3 conversion does not round as the GPU and torch do)
        assert "st.global" in write and ("div.rn.f32" in write) == fp8 and "div.full" not in write


@pytest.mark.gpu
def test_ops_replay_in_a_cuda_graph_with_new_inputs_and_padding_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Capture every op once (after a warm-up that compiles the kernels), then replay on new
    contents: different values, and a different set of slot -1 padding rows."""
    pytest.importorskip("triton")
    monkeypatch.delenv("PDLAUNCH_FUSED_OPS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    dtype, device = torch.bfloat16, "cuda"
    x, residual = torch.randn(4, 96, dtype=dtype, device=device), torch.randn(4, 96, dtype=dtype, device=device)
    weight = torch.randn(96, dtype=dtype, device=device)
    q, k, v = _qkv_views(4, 8, 2, 64, dtype, device)
    cos, sin = rotary_cos_sin(torch.arange(4, device=device), compute_inv_freq(64, 10000.0, None, 4096).to(device),
                              dtype)
    gate_up = torch.randn(4, 2 * 75, dtype=dtype, device=device)
    cache = torch.zeros(7, 2, 2, 4, 2, 64, dtype=dtype, device=device)
    fused_cache = torch.zeros_like(cache)
    hw = torch.randn(64, dtype=dtype, device=device)
    slots = torch.tensor([3, -1, 9, 20], device=device)

    def step() -> tuple[torch.Tensor, ...]:
        normed = fused_norm.rms_norm(x, weight, 1e-5)
        y, new_residual = fused_norm.fused_add_rms_norm(x, residual, weight, 1e-5)
        q_out, k_out = fused_rotary.apply_rotary(q, k, cos, sin)
        fused_ops.write_kv(cache, k_out, v, slots, 1)
        fused_q, _ = fused_rotary.rotary_write_kv(q, k, v, cos, sin, fused_cache, slots, 0, head_norm=(hw, hw, 1e-6))
        return normed, y, new_residual, q_out, k_out, fused_ops.silu_and_mul(gate_up), fused_q

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        normed, y, new_residual, q_out, k_out, act, fused_q = step()

    for t in (x, residual, q, k, v, gate_up):
        t.copy_(torch.randn_like(t))
    slots.copy_(torch.tensor([-1, 27, 0, -1], device=device))
    cache.zero_()
    fused_cache.zero_()
    graph.replay()
    torch.cuda.synchronize()

    _assert_rms_close(normed, rms_norm_torch(x, weight, 1e-5))
    _assert_equal(new_residual, x + residual)
    _assert_rms_close(y, rms_norm_torch(x + residual, weight, 1e-5))
    want_q, want_k = apply_rotary_torch(q, k, cos, sin)
    _assert_equal(q_out, want_q)
    _assert_equal(k_out, want_k)
    _assert_equal(act, silu_and_mul_torch(gate_up))
    want_cache = torch.zeros_like(cache)
    write_kv_torch(want_cache, want_k, v, slots, 1)
    _assert_equal(cache, want_cache)
    normed_q = rms_norm_torch(q.reshape(-1, 64), hw, 1e-6).view_as(q)
    normed_k = rms_norm_torch(k.reshape(-1, 64), hw, 1e-6).view_as(k)
    want_q, want_k = apply_rotary_torch(normed_q, normed_k, cos, sin)
    _assert_rms_close(fused_q, want_q)
    want_cache.zero_()
    write_kv_torch(want_cache, want_k, v, slots, 0)
    _assert_rms_close(fused_cache, want_cache)


# ---- dispatch and errors (no triton needed) ------------------------------------------------------

def test_cpu_without_interpreter_runs_the_references(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PDLAUNCH_FUSED_OPS", raising=False)
    assert not fused_ops.use_triton(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PDLAUNCH_FUSED_OPS", "torch")
    assert not fused_ops.use_triton(torch.zeros(1))
    x, w = torch.randn(2, 32), torch.randn(32)
    assert torch.equal(fused_norm.rms_norm(x, w, 1e-5), rms_norm_torch(x, w, 1e-5))


def test_write_kv_rejects_a_non_contiguous_cache() -> None:
    cache = torch.zeros(2, 2, 2, 4, 3, 8).transpose(0, 1)
    with pytest.raises(PdlaunchError) as err:
        fused_ops.write_kv(cache, torch.zeros(1, 3, 8), torch.zeros(1, 3, 8), torch.tensor([0]), 0)
    assert err.value.field == "kv_cache"


# ---- references vs the model code they replace (CPU, always run) ---------------------------------

def test_fused_add_rms_norm_reference_sums_partial_rows() -> None:
    torch.manual_seed(3)
    rows = torch.randn(4, 8, 64, dtype=torch.bfloat16)
    residual = torch.randn(4, 64, dtype=torch.bfloat16)
    weight = torch.randn(64, dtype=torch.bfloat16)
    y, new_residual = fused_add_rms_norm_torch(rows, residual, weight, 1e-6)
    want_y, want_residual = fused_add_rms_norm_torch(rows.sum(dim=1), residual, weight, 1e-6)
    assert torch.equal(new_residual, want_residual) and torch.equal(y, want_y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_reference_is_the_model_rmsnorm(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5).to(dtype)
    norm.weight.data.copy_(torch.randn(96))
    x = torch.randn(7, 96, dtype=dtype) * 2
    assert torch.equal(rms_norm_torch(x, norm.weight, 1e-5), norm(x))
    # The decoder layer's `h = h + attn_out; post_attention_layernorm(h)`.
    attn_out = torch.randn(7, 96, dtype=dtype)
    y, new_residual = fused_add_rms_norm_torch(attn_out, x, norm.weight, 1e-5)
    assert torch.equal(new_residual, x + attn_out) and torch.equal(y, norm(x + attn_out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
def test_rotary_reference_is_the_model_rotary_embedding(dtype: torch.dtype, scaling: RopeScaling | None) -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(128, 500000.0, scaling, 131072)
    positions = torch.tensor([0, 3, 900, 70000])
    q, k, _ = _qkv_views(4, 8, 2, 128, dtype, "cpu")
    want_q, want_k = rope(positions, q, k)
    got_q, got_k = apply_rotary_torch(q, k, *rotary_cos_sin(positions, rope.inv_freq, dtype))
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_silu_and_mul_reference_is_the_model_mlp_activation() -> None:
    gate_up = torch.randn(3, 2 * 40, dtype=torch.bfloat16) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(silu_and_mul_torch(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("layer_in_group", [0, 1])
def test_write_kv_reference_is_the_paged_attention_write(layer_in_group: int) -> None:
    """paged_attention writes k/v of a fresh prefill into the cache; write_kv_torch must agree."""
    torch.manual_seed(layer_in_group)
    tokens, block_size, hkv, head_dim = 6, 4, 2, 16
    cache = torch.randn(5, 2, 2, block_size, hkv, head_dim)
    want = cache.clone()
    q, k, v = _qkv_views(tokens, 4, hkv, head_dim, torch.float32, "cpu")
    slots = torch.tensor([13, -1, 2, 19, 8, -1])
    attn = AttentionMetadata(
        query_start_loc=torch.tensor([0, tokens]), seq_lens=torch.tensor([tokens]), context_lens=torch.tensor([0]),
        slot_mapping=[slots], block_tables=[torch.tensor([[3, 0, 4, 2]])], max_query_len=tokens,
        max_seq_len=tokens, query_lens_cpu=[tokens], seq_lens_cpu=[tokens])
    plan = build_group_plan(attn, 0, want, None)
    paged_attention(q, k, v, want, layer_in_group, plan, head_dim ** -0.5)
    write_kv_torch(cache, k, v, slots, layer_in_group)
    assert torch.equal(cache, want)
