"""Fused elementwise ops for the model's hot path: one Triton kernel each on CUDA, torch elsewhere.

Each public op dispatches through `fused_available`: the Triton kernel runs for fp16/bf16/fp32
CUDA tensors (or CPU ones under TRITON_INTERPRET=1) when Triton is importable and
PDLAUNCH_FUSED_OPS is not `torch`; otherwise the `*_torch` reference runs. The references are
the model's eager semantics and the kernels reproduce them rounding step for rounding step:
every bf16/fp16 op of the eager code is an fp32 op rounded to the dtype, so the kernels round
at the same points, use correctly rounded division/sqrt (`div_rn`, `sqrt_rn`; Triton's `/` is
approximate) and launch with `enable_fp_fusion=False` so fp32 `a*b + c*d` is not contracted
into an FMA.

Kernels are CUDA-graph capturable: outputs are sized from input shapes only, there is no host
sync, and write_kv skips slot < 0 with a store mask rather than a host-side filter.
Kernels are built lazily per interpret mode because Triton reads TRITON_INTERPRET when
`@triton.jit` decorates, not when a kernel launches; its own library helpers (tl.sum) are
decorated at `import triton`, so the interpreter needs the variable set before that import.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.overrides import env_choice
from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs, pdl_release
from pdlaunch.model.quant import kv_cache as fp8_kv
from pdlaunch.model.quant.fp8 import FP8_DTYPE, FP8_MAX, INV_FP8_MAX, Fp8Rows
from pdlaunch.model.triton_env import interpret_mode, triton_importable

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn)


def fused_ops_setting() -> str:
    """PDLAUNCH_FUSED_OPS: `auto` (unset or empty) or `torch`; any other value is refused naming the variable."""
    return env_choice("PDLAUNCH_FUSED_OPS", ("auto", "torch"))


def _use_triton(t: torch.Tensor) -> bool:
    """True when `t`'s op should run the Triton kernel (CUDA or interpreter, not forced off). A CPU tensor outside
    the interpreter never reads the variable: a CPU instance does not fail a step on a GPU setting."""
    if not (t.is_cuda or interpret_mode()):
        return False
    return fused_ops_setting() != "torch" and triton_importable()


def fused_available(t: torch.Tensor) -> bool:
    """True when the ops on tensors like `t` run their Triton kernel: no host sync, CUDA-graph
    capturable. Needs a kernel dtype (fp16/bf16/fp32); others (an fp8 KV cache) take the reference."""
    return t.dtype in _KERNEL_DTYPES and _use_triton(t)


def _check(ok: bool, field: str, message: str, hint: str) -> None:
    if not ok:
        raise PdlaunchError(message, field=field, hint=hint)


@lru_cache(maxsize=2)
def _kernels(interpret: bool) -> SimpleNamespace:
    """The Triton kernels, decorated in the given interpret mode (the cache key keeps modes apart)."""
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_groups(y, q_ptr, s_ptr, width, stride_sg, BLOCK: tl.constexpr, FMAX: tl.constexpr,
                        INV_FMAX: tl.constexpr):
        # BLOCK float32 values of a row (already rounded to the activations' dtype) as fp8 from q_ptr, in groups of
        # 128 columns, the first `width` of them stored, each group's scale at s_ptr + group * stride_sg: the same
        # float32 operations as quant/kernels.py's quant_rows_kernel, so the values are equal to its.
        g = tl.reshape(y, (BLOCK // 128, 128))
        scale = tl.maximum(tl.max(tl.abs(g), axis=1) * INV_FMAX, 1e-12)
        q = tl.clamp(tl.math.div_rn(g, scale[:, None]), -FMAX, FMAX)
        groups = tl.arange(0, BLOCK // 128)
        cols = groups[:, None] * 128 + tl.arange(0, 128)[None, :]
        tl.store(q_ptr + cols, q.to(q_ptr.dtype.element_ty), mask=cols < width)
        tl.store(s_ptr + groups * stride_sg, scale, mask=groups * 128 < width)

    @triton.jit
    def normalize(x, w, H, eps, dtype: tl.constexpr):
        # HF's RMSNorm of one row: x float32 [BLOCK_H] (values of `dtype`, zero past H), w its float32 weight ->
        # float32 values of `dtype`: normalised in fp32, rounded to dtype, then scaled (a dtype product). Shared by
        # rms_norm_kernel and model/moe/router.py's router product (norm_and_route, via `normalize_helper`): they
        # round alike.
        var = tl.math.div_rn(tl.sum(x * x, axis=0), H * 1.0)
        y = (x * tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))).to(dtype).to(tl.float32)
        return (w * y).to(dtype).to(tl.float32)

    @triton.jit
    def rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, res_out_ptr, s_ptr, H, eps,
                        sx_t, sx_p, sx_h, sr_t, sr_h, w_stride, stride_st, stride_sg,
                        ADD_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr, PARTS: tl.constexpr, PDL: tl.constexpr,
                        RELEASE: tl.constexpr, QUANT: tl.constexpr, QUANTIZE: tl.constexpr, FMAX: tl.constexpr,
                        INV_FMAX: tl.constexpr, NORMALIZE: tl.constexpr):
        # One program per token row; y/res_out are contiguous [T, H]. PARTS > 1: x is [T, PARTS, H] rows whose sum
        # is the input, added in float32 and rounded once (torch's sum over a bf16 dim). QUANT: y is fp8, its
        # 128-column groups' scales at s_ptr (QUANTIZE: quantize_groups; the FP8 layer after skips its launch).
        t = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        w = tl.load(w_ptr + cols * w_stride, mask=mask, other=0.0).to(tl.float32)  # a weight: no kernel writes it
        if PDL:  # triton_decode.pdl_enabled
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        elif RELEASE:  # triton_decode.pdl_release: a decode batch's SwiGLU GEMM after this kernel may start
            tl.extra.cuda.gdc_launch_dependents()
        dtype = w_ptr.dtype.element_ty  # x's (checked); y's too, but for QUANT
        if PARTS > 1:
            total = tl.zeros([BLOCK_H], tl.float32)
            for j in tl.static_range(PARTS):
                total += tl.load(x_ptr + t * sx_t + j * sx_p + cols * sx_h, mask=mask, other=0.0).to(tl.float32)
            x = total.to(dtype)
        else:
            x = tl.load(x_ptr + t * sx_t + cols * sx_h, mask=mask, other=0.0)
        if ADD_RESIDUAL:
            r = tl.load(r_ptr + t * sr_t + cols * sr_h, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(res_out_ptr + t * H + cols, x, mask=mask)
        y = NORMALIZE(x.to(tl.float32), w, H, eps, dtype)  # HF order (normalize)
        if QUANT:
            QUANTIZE(y, y_ptr + t * H, s_ptr + t * stride_st, H, stride_sg, BLOCK_H, FMAX, INV_FMAX)
        else:
            tl.store(y_ptr + t * H + cols, y.to(dtype), mask=mask)

    # The q and the k half of rotary_kernel. It is handed to the kernel as ROTATE (a constexpr) because
    # Triton's interpreter resolves a kernel's callees among module globals only, and these kernels are
    # built here, per interpret mode.
    @triton.jit
    def rotate_heads(x_ptr, out_ptr, w_ptr, t, s_t, s_h, s_d, num_heads, d, partner, first_half, cos, sin, eps,
                     D: tl.constexpr, H_PAD: tl.constexpr, NORM: tl.constexpr):
        # Token t's heads [H, D] of q or k, rotated into out (contiguous [T, H, D]) and returned. NORM: each
        # head's row first goes through HF's RMSNorm (Qwen3's q_norm / k_norm, weight w [D]) as rms_norm_kernel
        # computes it: the partner half is normalised with the same row statistic.
        dtype = out_ptr.dtype.element_ty
        h = tl.arange(0, H_PAD)[:, None]
        mask = (h < num_heads) & (d < D)
        x = tl.load(x_ptr + t * s_t + h * s_h + d * s_d, mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(x_ptr + t * s_t + h * s_h + partner * s_d, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            var = tl.math.div_rn(tl.sum(x * x, axis=1), D * 1.0)[:, None]
            rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
            w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
            wp = tl.load(w_ptr + partner, mask=d < D, other=0.0).to(tl.float32)
            x = (w * (x * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            xp = (wp * (xp * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        a = (x * cos).to(dtype).to(tl.float32)
        b = (tl.where(first_half, -xp, xp) * sin).to(dtype).to(tl.float32)
        y = (a + b).to(dtype)
        tl.store(out_ptr + (t * num_heads + h) * D + d, y, mask=mask)
        return y

    @triton.jit
    def rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, num_q_heads, num_kv_heads,
                      sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sc_t, sc_d, ss_t, ss_d,
                      qw_ptr, kw_ptr, eps, v_ptr, sv_t, sv_h, sv_d, cache_ptr, slot_ptr, block_size, block_stride,
                      layer_offset, k_scale, v_scale,
                      D: tl.constexpr, D_PAD: tl.constexpr, HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
                      ROTATE: tl.constexpr, NORM: tl.constexpr, WRITE_KV: tl.constexpr, FP8: tl.constexpr,
                      PDL: tl.constexpr):
        # One program per token: cos/sin [D] loaded once for its q [Hq, D] and k [Hkv, D];
        # outputs are contiguous. rotate_half(x)[d] = -x[d + D/2] (d < D/2), x[d - D/2] (d >= D/2).
        # WRITE_KV: the rotated k and the token's v also go to its cache slot, as write_kv_kernel writes them.
        if PDL:  # triton_decode.pdl_enabled
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        t = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, D_PAD)
        first_half = (d < D // 2)[None, :]
        partner = tl.where(d < D // 2, d + D // 2, d - D // 2)[None, :]
        cos = tl.load(cos_ptr + t * sc_t + d * sc_d, mask=d < D, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + t * ss_t + d * ss_d, mask=d < D, other=0.0).to(tl.float32)[None, :]
        d = d[None, :]
        ROTATE(q_ptr, q_out_ptr, qw_ptr, t, sq_t, sq_h, sq_d, num_q_heads, d, partner, first_half, cos, sin, eps,
               D, HQ_PAD, NORM)
        k = ROTATE(k_ptr, k_out_ptr, kw_ptr, t, sk_t, sk_h, sk_d, num_kv_heads, d, partner, first_half, cos, sin,
                   eps, D, HKV_PAD, NORM)
        if WRITE_KV:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            heads = tl.arange(0, HKV_PAD)[:, None]
            mask = (heads < num_kv_heads) & (d < D) & (tl.full([HKV_PAD, D_PAD], 0, tl.int64) <= slot)
            row = (slot // block_size) * block_stride + layer_offset + (slot % block_size) * num_kv_heads * D
            dst = cache_ptr + row + heads * D + d
            v = tl.load(v_ptr + t * sv_t + heads * sv_h + d * sv_d, mask=mask)
            if FP8:  # as write_kv_kernel: x / scale saturated to +-448
                k = tl.clamp(tl.math.div_rn(k.to(tl.float32), k_scale), -448.0, 448.0)
                v = tl.clamp(tl.math.div_rn(v.to(tl.float32), v_scale), -448.0, 448.0)
            cache_dtype = cache_ptr.dtype.element_ty
            tl.store(dst, k.to(cache_dtype), mask=mask)
            tl.store(dst + block_size * num_kv_heads * D, v.to(cache_dtype), mask=mask)

    @triton.jit
    def silu_and_mul_kernel(x_ptr, out_ptr, s_ptr, inter, sx_t, sx_i, stride_st, stride_sg,
                            BLOCK: tl.constexpr, LIBDEVICE_EXP: tl.constexpr, PDL: tl.constexpr,
                            QUANT: tl.constexpr, QUANTIZE: tl.constexpr, FMAX: tl.constexpr,
                            INV_FMAX: tl.constexpr):
        # grid (T, cdiv(I, BLOCK)); x: [T, 2I] -> out: [T, I] contiguous. QUANT: out is fp8 in 128-column groups,
        # their scales at s_ptr (as rms_norm_kernel's).
        if PDL:  # triton_decode.pdl_enabled
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(x_ptr + t * sx_t + cols * sx_i, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + t * sx_t + (cols + inter) * sx_i, mask=mask, other=0.0).to(tl.float32)
        # torch's CUDA silu is x / (1 + expf(-x)); libdevice expf is that expf, tl.exp is ex2.approx.
        if LIBDEVICE_EXP:
            e = tl.extra.cuda.libdevice.exp(-gate)
        else:
            e = tl.exp(-gate)  # the interpreter has no libdevice; numpy's exp
        dtype = x_ptr.dtype.element_ty  # out's too, but for QUANT
        silu = tl.math.div_rn(gate, 1.0 + e).to(dtype).to(tl.float32)
        if QUANT:  # BLOCK and inter are multiples of 128 (silu_and_mul_fp8): the program's groups are whole
            first = tl.program_id(1) * BLOCK
            QUANTIZE((silu * up).to(dtype).to(tl.float32), out_ptr + t * inter + first,
                     s_ptr + t * stride_st + first // 128 * stride_sg, inter - first, stride_sg, BLOCK, FMAX, INV_FMAX)
        else:
            tl.store(out_ptr + t * inter + cols, (silu * up).to(dtype), mask=mask)

    @triton.jit
    def write_kv_kernel(cache_ptr, k_ptr, v_ptr, slot_ptr, num_kv_heads, block_size, block_stride, layer_offset,
                        sk_t, sk_h, sk_d, sv_t, sv_h, sv_d, k_scale, v_scale,
                        D: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr, FP8: tl.constexpr,
                        PDL: tl.constexpr):
        # One program per token; the cache plane [block_size, Hkv, D] of (block, layer, k|v) is contiguous.
        if PDL:  # triton_decode.pdl_enabled
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        heads = tl.arange(0, H_PAD)
        d = tl.arange(0, D_PAD)
        mask = (heads < num_kv_heads)[:, None] & (d < D)[None, :] & (tl.full([H_PAD, D_PAD], 0, tl.int64) <= slot)
        plane = block_size * num_kv_heads * D
        row = (slot // block_size) * block_stride + layer_offset + (slot % block_size) * num_kv_heads * D
        dst = cache_ptr + row + heads[:, None] * D + d[None, :]
        dtype = cache_ptr.dtype.element_ty
        k = tl.load(k_ptr + t * sk_t + heads[:, None] * sk_h + d[None, :] * sk_d, mask=mask)
        v = tl.load(v_ptr + t * sv_t + heads[:, None] * sv_h + d[None, :] * sv_d, mask=mask)
        if FP8:  # fp8 cache: store x / scale saturated to +-448 (model/quant/kv_cache.py)
            k = tl.clamp(tl.math.div_rn(k.to(tl.float32), k_scale), -448.0, 448.0)  # torch's division, rounded
            v = tl.clamp(tl.math.div_rn(v.to(tl.float32), v_scale), -448.0, 448.0)
        tl.store(dst, k.to(dtype), mask=mask)
        tl.store(dst + plane, v.to(dtype), mask=mask)

    @triton.jit
    def cos_sin_kernel(pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr, D: tl.constexpr, D_PAD: tl.constexpr,
                       LIBDEVICE: tl.constexpr):
        # One program per token: cos/sin [D] of position * inv_freq[d % (D/2)], as rotary_cos_sin_torch computes
        # them (the position converted to float32, one float32 product, cosf/sinf, rounded to the output's dtype).
        t = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, D_PAD)
        mask = d < D
        pos = tl.load(pos_ptr + t).to(tl.float32)
        x = pos * tl.load(inv_freq_ptr + d % (D // 2), mask=mask, other=0.0)
        if LIBDEVICE:  # torch's CUDA cos/sin are cosf/sinf: libdevice's; tl.cos/tl.sin may be the approximate ones
            c = tl.extra.cuda.libdevice.cos(x)
            s = tl.extra.cuda.libdevice.sin(x)
        else:  # the interpreter has no libdevice; numpy's
            c = tl.cos(x)
            s = tl.sin(x)
        tl.store(cos_ptr + t * D + d, c.to(cos_ptr.dtype.element_ty), mask=mask)
        tl.store(sin_ptr + t * D + d, s.to(sin_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def argmax_chunks_kernel(x_ptr, stride, V, val_ptr, idx_ptr, chunks, BLOCK: tl.constexpr):
        # grid (N, chunks): the largest value of one BLOCK-wide chunk of a row and its first column. A NaN
        # counts as larger than every number (torch.argmax): then the value is NaN and the column the first NaN's.
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        nan = x != x
        first_nan = tl.min(tl.where(nan, cols, V), 0)
        numbers = tl.where(nan, float("-inf"), x)
        best = tl.max(numbers, 0)
        # The first column holding it (all -inf, padding included, picks the chunk's first column, a real one).
        col = tl.min(tl.where(numbers == best, cols, V), 0)
        at = row * chunks + chunk
        tl.store(val_ptr + at, tl.where(first_nan < V, float("nan"), best))
        tl.store(idx_ptr + at, tl.where(first_nan < V, first_nan, col))

    @triton.jit
    def argmax_rows_kernel(val_ptr, idx_ptr, out_ptr, chunks, C_PAD: tl.constexpr):
        # grid (N,): the first chunk holding the row's largest value (or its first NaN) gives the column.
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, C_PAD)
        v = tl.load(val_ptr + row * chunks + c, mask=c < chunks, other=float("-inf"))
        nan = v != v
        first_nan = tl.min(tl.where(nan, c, C_PAD), 0)
        numbers = tl.where(nan, float("-inf"), v)
        best = tl.min(tl.where(numbers == tl.max(numbers, 0), c, C_PAD), 0)
        pick = tl.where(first_nan < C_PAD, first_nan, best)
        tl.store(out_ptr + row, tl.load(idx_ptr + row * chunks + pick).to(tl.int64))

    return SimpleNamespace(rms_norm=rms_norm_kernel, normalize=normalize, quantize_groups=quantize_groups,
                           rotary=rotary_kernel, cos_sin=cos_sin_kernel,
                           rotate_heads=rotate_heads,
                           silu_and_mul=silu_and_mul_kernel, write_kv=write_kv_kernel,
                           argmax_chunks=argmax_chunks_kernel, argmax_rows=argmax_rows_kernel,
                           next_power_of_2=triton.next_power_of_2)


def normalize_helper() -> object:
    """The Triton helper that computes one RMSNorm row as rms_norm_kernel does, for another module's kernel to take as
    a constexpr argument (Triton's interpreter resolves callees among a kernel's module globals only)."""
    interpret = interpret_mode()
    helper = _kernels(interpret).normalize
    if interpret:  # the interpreter makes triton.language visible to this module's functions when it rewrites one;
        helper.rewrite()  # a callee of another module's kernel is checked for it before it is rewritten
    return helper


def _num_warps(elements: int) -> int:
    return max(1, min(8, elements // 256))


# ---- torch references: the eager semantics the kernels reproduce --------------------------------

def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H], weight: [H] -> [T, H]; HF LlamaRMSNorm."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H] -> (rms_norm(x + residual) [T, H], x + residual [T, H]). x may be [T, k, H] partial
    rows (an MoE layer's weighted expert outputs): their sum over k is the input."""
    if x.dim() == 3:
        x = x.sum(dim=1)
    new_residual = x + residual
    return rms_norm_torch(new_residual, weight, eps), new_residual


def rotary_cos_sin_torch(positions: torch.Tensor, inv_freq: torch.Tensor,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T], inv_freq: [D/2] fp32 -> cos, sin: [T, D] in dtype, as RotaryEmbedding builds them."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.unsqueeze(0)  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D], cos/sin: [T, D] -> rotated (q, k)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, D]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] -> silu(gate) * up: [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _kv_rows(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, layer_in_group: int) -> torch.Tensor:
    """[T] row of (block, layer_in_group, k, offset) in kv_cache viewed as [rows, Hkv, D]."""
    _, layers, _, block_size, _, _ = kv_cache.shape
    slots = slot_mapping.long()
    return (slots // block_size) * (layers * 2 * block_size) + 2 * layer_in_group * block_size + slots % block_size


def write_kv_torch(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                   layer_in_group: int, kv_scales: tuple[float, float] = (1.0, 1.0)) -> None:
    """In place: k, v [T, Hkv, D] into their slots of kv_cache; slots < 0 are skipped (host sync)."""
    flat = kv_cache.view(-1, kv_cache.shape[-2], kv_cache.shape[-1])  # [rows, Hkv, D]
    tokens = (slot_mapping >= 0).nonzero().squeeze(-1)
    rows = _kv_rows(kv_cache, slot_mapping, layer_in_group)[tokens]
    fp8_kv.write_rows(flat, rows, k[tokens], kv_scales[0])
    fp8_kv.write_rows(flat, rows + kv_cache.shape[3], v[tokens], kv_scales[1])


# ---- public ops --------------------------------------------------------------------------------

def _fp8_rows(tokens: int, width: int, column_major: bool, like: torch.Tensor) -> Fp8Rows:
    """Empty Fp8Rows [tokens, width] (width a multiple of 128) for a kernel to quantize `like`'s values into."""
    q = torch.empty(tokens, width, dtype=FP8_DTYPE, device=like.device)
    groups = width // 128
    scales = (torch.empty(groups, tokens, dtype=torch.float32, device=like.device).t() if column_major
              else torch.empty(tokens, groups, dtype=torch.float32, device=like.device))
    return Fp8Rows(q, scales, column_major, like.dtype)


def _check_fp8_width(width: int, field: str) -> None:
    _check(width % 128 == 0, field, f"{width} columns do not split into 128-column FP8 groups",
           "quantize in the kernel only for a block-FP8 layer's input (quant/kernels.py fp8_input_layout)")


def _rms_norm_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     fp8: bool | None = None) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor | None]:
    """The norm kernel; `fp8` not None: y quantized into Fp8Rows, scales column-major when True."""
    _check(weight.dtype == x.dtype and weight.shape == (x.shape[-1],), "weight",
           f"weight {tuple(weight.shape)} {weight.dtype} does not match x {tuple(x.shape)} {x.dtype}",
           "weight must be [H] in x's dtype")
    kernels = _kernels(interpret_mode())
    tokens, hidden = x.shape[0], x.shape[-1]
    parts = x.shape[1] if x.dim() == 3 else 1
    rows = None
    if fp8 is None:
        y = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
        scales = y
    else:
        _check_fp8_width(hidden, "x")
        rows = _fp8_rows(tokens, hidden, fp8, x)
        y, scales = rows.q, rows.scales
    pdl = pdl_enabled(x, tokens)
    res_out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device) if residual is not None else None
    r = residual if residual is not None else x
    block = kernels.next_power_of_2(hidden)
    kernels.rms_norm[(tokens,)](x, r, weight, y, res_out if res_out is not None else y, scales, hidden, eps,
                                x.stride(0), x.stride(1) if parts > 1 else 0, x.stride(-1), r.stride(0), r.stride(-1),
                                weight.stride(0), scales.stride(0), scales.stride(1),
                                ADD_RESIDUAL=residual is not None, BLOCK_H=block, PARTS=parts,
                                PDL=pdl, RELEASE=not pdl and pdl_release(x, tokens), QUANT=fp8 is not None,
                                QUANTIZE=kernels.quantize_groups, FMAX=FP8_MAX, INV_FMAX=INV_FP8_MAX,
                                NORMALIZE=kernels.normalize, num_warps=_num_warps(block), enable_fp_fusion=False,
                                **pdl_kwargs(pdl))
    return (y if rows is None else rows), res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H] (any strides), weight: [H] in x's dtype -> new [T, H]."""
    if not fused_available(x):
        return rms_norm_torch(x, weight, eps)
    y = _rms_norm_launch(x, None, weight, eps)[0]
    assert isinstance(y, torch.Tensor)
    return y


def _check_residual(x: torch.Tensor, residual: torch.Tensor) -> None:
    _check(x.dim() in (2, 3) and residual.shape == (x.shape[0], x.shape[-1]) and residual.dtype == x.dtype,
           "residual",
           f"residual {tuple(residual.shape)} {residual.dtype} does not match x {tuple(x.shape)} {x.dtype}",
           "pass the residual stream of the same tokens")


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H] -> (y, new_residual), both new [T, H]: new_residual = x + residual. x may also be
    [T, k, H] partial rows, summed over k first (an MoE layer's combine, done here instead of by its own kernel)."""
    if not fused_available(x):
        return fused_add_rms_norm_torch(x, residual, weight, eps)
    _check_residual(x, residual)
    y, new_residual = _rms_norm_launch(x, residual, weight, eps)
    assert isinstance(y, torch.Tensor) and new_residual is not None
    return y, new_residual


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                 column_major: bool) -> tuple[Fp8Rows, torch.Tensor | None]:
    """rms_norm (residual None) or fused_add_rms_norm, its output quantized per row and 128-column group in the
    same kernel, as quant/kernels.py's quantize_rows would quantize it (equal values) -> (Fp8Rows for a block-FP8
    layer, scales column-major when `column_major`; the new residual or None). Needs the fused ops
    (`fused_available(x)`) and H a multiple of 128."""
    _check(fused_available(x), "x", f"a {x.device.type} {x.dtype} tensor has no fused kernels",
           "quantize in the norm only where fused_available(x)")
    if residual is not None:
        _check_residual(x, residual)
    y, new_residual = _rms_norm_launch(x, residual, weight, eps, column_major)
    assert isinstance(y, Fp8Rows)
    return y, new_residual


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] (any integer dtype), inv_freq: [D/2] float32 -> cos, sin: [T, D] in dtype; one kernel on CUDA
    where the reference takes seven (a decode step's first ~10 us, H200 trace), equal bit for bit."""
    if (dtype not in (torch.float16, torch.bfloat16, torch.float32) or not _use_triton(positions)
            or positions.dim() != 1
            or inv_freq.dtype != torch.float32 or inv_freq.dim() != 1 or not inv_freq.is_contiguous()
            or positions.device != inv_freq.device or positions.stride(0) != 1):
        return rotary_cos_sin_torch(positions, inv_freq, dtype)
    tokens, head_dim = positions.shape[0], 2 * inv_freq.shape[0]
    cos = torch.empty(tokens, head_dim, dtype=dtype, device=positions.device)
    sin = torch.empty(tokens, head_dim, dtype=dtype, device=positions.device)
    if tokens:
        interpret = interpret_mode()
        kernels = _kernels(interpret)
        kernels.cos_sin[(tokens,)](positions, inv_freq, cos, sin, D=head_dim, D_PAD=kernels.next_power_of_2(head_dim),
                                   LIBDEVICE=not interpret, num_warps=1, enable_fp_fusion=False)
    return cos, sin


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D] (strided views allowed), cos/sin: [T, D] in q's dtype
    -> new contiguous (q_out, k_out)."""
    if not fused_available(q):
        return apply_rotary_torch(q, k, cos, sin)
    tokens, num_q_heads, head_dim = q.shape
    _check(k.dtype == q.dtype and k.shape[0] == tokens and k.shape[2] == head_dim and head_dim % 2 == 0, "k",
           f"k {tuple(k.shape)} {k.dtype} does not pair with q {tuple(q.shape)} {q.dtype}",
           "q and k need the same tokens, head_dim (even) and dtype")
    _check(cos.shape == (tokens, head_dim) and sin.shape == cos.shape and cos.dtype == q.dtype == sin.dtype,
           "cos", f"cos/sin must be [{tokens}, {head_dim}] in {q.dtype}", "build them with rotary_cos_sin")
    return _rotary_launch(q, k, cos, sin, None, None)


def _rotary_launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   norm: tuple[torch.Tensor, torch.Tensor, float] | None,
                   write: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, tuple[float, float]] | None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary kernel; `norm` (q weight, k weight, eps) and `write` (v, cache, slots, layer, scales) on
    request. Shapes are checked by the callers."""
    kernels = _kernels(interpret_mode())
    tokens, num_q_heads, head_dim = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    pdl = pdl_enabled(q, tokens)
    npow2 = kernels.next_power_of_2
    q_weight, k_weight, eps = norm if norm is not None else (q, k, 0.0)
    v, cache, slots, layer_in_group, (k_scale, v_scale) = write if write is not None else (k, q, cos, 0, (1.0, 1.0))
    block_size = plane = block_stride = 0
    if write is not None:
        _, layers, _, block_size, _, _ = cache.shape
        plane = block_size * k.shape[1] * head_dim
        block_stride = layers * 2 * plane
    kernels.rotary[(tokens,)](q, k, cos, sin, q_out, k_out, num_q_heads, k.shape[1], *q.stride(), *k.stride(),
                              *cos.stride(), *sin.stride(), q_weight, k_weight, eps, v, *v.stride(), cache, slots,
                              block_size, block_stride, 2 * layer_in_group * plane, k_scale, v_scale,
                              D=head_dim, D_PAD=npow2(head_dim), HQ_PAD=npow2(num_q_heads), HKV_PAD=npow2(k.shape[1]),
                              ROTATE=kernels.rotate_heads, NORM=norm is not None, WRITE_KV=write is not None,
                              FP8=cache.dtype == torch.float8_e4m3fn, PDL=pdl,
                              num_warps=_num_warps(npow2(num_q_heads) * head_dim), enable_fp_fusion=False,
                              **pdl_kwargs(pdl))
    return q_out, k_out


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    kv_cache: torch.Tensor, slot_mapping: torch.Tensor, layer_in_group: int,
                    kv_scales: tuple[float, float] = (1.0, 1.0),
                    head_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention layer's work between its qkv projection and attention, in one kernel on CUDA:
    `head_norm` (q weight [D], k weight [D], eps: Qwen3's per-head RMSNorm) when given, rotary on q and
    k, and the rotated k with v written into their cache slots (slot < 0: skipped). Same values as
    rms_norm, apply_rotary and write_kv in turn; returns the new contiguous (q, k)."""
    if head_norm is not None:
        _check(head_norm[0].shape == head_norm[1].shape == (q.shape[2],) and head_norm[0].dtype == q.dtype,
               "head_norm", f"q/k norm weights must be [{q.shape[2]}] in {q.dtype}",
               "pass the per-head RMSNorm weights")
    fused = fused_available(q) and fused_available(kv_cache) and kv_cache.is_contiguous()
    if fused:
        _check(v.shape == k.shape and v.dtype == k.dtype and kv_cache.shape[-2:] == k.shape[1:], "v",
               f"v {tuple(v.shape)} {v.dtype} / cache heads {tuple(kv_cache.shape[-2:])} do not fit k "
               f"{tuple(k.shape)} {k.dtype}", "k and v are [T, num_kv_heads, head_dim], as the cache holds them")
        _check(0 <= layer_in_group < kv_cache.shape[1], "layer_in_group",
               f"{layer_in_group} is outside 0..{kv_cache.shape[1] - 1}", "pass the layer's index within its group")
    if not fused:
        if head_norm is not None:
            t, hq, dim = q.shape
            q = rms_norm(q.reshape(-1, dim), head_norm[0], head_norm[2]).view(t, hq, dim)
            k = rms_norm(k.reshape(-1, dim), head_norm[1], head_norm[2]).view(t, k.shape[1], dim)
        q, k = apply_rotary(q, k, cos, sin)
        write_kv(kv_cache, k, v, slot_mapping, layer_in_group, kv_scales)
        return q, k
    tokens, _, head_dim = q.shape
    _check(k.dtype == q.dtype and k.shape[0] == tokens and k.shape[2] == head_dim and head_dim % 2 == 0
           and slot_mapping.shape == (tokens,), "k",
           f"k {tuple(k.shape)} {k.dtype} / slots {tuple(slot_mapping.shape)} do not pair with q {tuple(q.shape)}",
           "q and k need the same tokens, head_dim (even) and dtype, one slot per token")
    _check(cos.shape == (tokens, head_dim) and sin.shape == cos.shape and cos.dtype == q.dtype == sin.dtype,
           "cos", f"cos/sin must be [{tokens}, {head_dim}] in {q.dtype}", "build them with rotary_cos_sin")
    return _rotary_launch(q, k, cos, sin, head_norm, (v, kv_cache, slot_mapping, layer_in_group, kv_scales))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] (any strides) -> new [T, I] = silu(gate) * up."""
    if not fused_available(gate_up):
        return silu_and_mul_torch(gate_up)
    out = _silu_and_mul_launch(gate_up, None)
    assert isinstance(out, torch.Tensor)
    return out


def silu_and_mul_fp8(gate_up: torch.Tensor, column_major: bool) -> Fp8Rows:
    """silu_and_mul, its output quantized per row and 128-column group in the same kernel, as quant/kernels.py's
    quantize_rows would quantize it (equal values): Fp8Rows for a block-FP8 down projection, scales column-major
    when `column_major`. Needs the fused ops (`fused_available(gate_up)`) and I a multiple of 128."""
    _check(fused_available(gate_up), "gate_up", f"a {gate_up.device.type} {gate_up.dtype} tensor has no fused kernels",
           "quantize in the SwiGLU only where fused_available(gate_up)")
    out = _silu_and_mul_launch(gate_up, column_major)
    assert isinstance(out, Fp8Rows)
    return out


def _silu_and_mul_launch(gate_up: torch.Tensor, fp8: bool | None) -> torch.Tensor | Fp8Rows:
    tokens, width = gate_up.shape
    _check(width % 2 == 0, "gate_up", f"last dim {width} is odd", "pass the [T, 2I] gate_up projection")
    inter = width // 2
    rows = None
    if fp8 is None:
        out = scales = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    else:
        _check_fp8_width(inter, "gate_up")
        rows = _fp8_rows(tokens, inter, fp8, gate_up)
        out, scales = rows.q, rows.scales
    interpret = interpret_mode()
    kernels = _kernels(interpret)
    block = min(1024, kernels.next_power_of_2(inter))
    pdl = pdl_enabled(gate_up, tokens)
    kernels.silu_and_mul[(tokens, -(-inter // block))](
        gate_up, out, scales, inter, gate_up.stride(0), gate_up.stride(1), scales.stride(0), scales.stride(1),
        BLOCK=block, LIBDEVICE_EXP=not interpret, PDL=pdl, QUANT=fp8 is not None, QUANTIZE=kernels.quantize_groups,
        FMAX=FP8_MAX, INV_FMAX=INV_FP8_MAX, num_warps=_num_warps(block), enable_fp_fusion=False, **pdl_kwargs(pdl))
    return out if rows is None else rows


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             layer_in_group: int, kv_scales: tuple[float, float] = (1.0, 1.0)) -> None:
    """In place. kv_cache: [num_blocks, layers_in_group, 2, block_size, Hkv, D] contiguous;
    k, v: [T, Hkv, D] (strided views allowed); slot_mapping: [T] int, slot < 0 = skip the token.
    kv_scales: (k_scale, v_scale) of an fp8 cache (ignored for other dtypes)."""
    _check(kv_cache.is_contiguous(), "kv_cache", "the KV cache tensor must be contiguous",
           "allocate it block-major as in pdlaunch/model/attention_metadata.py")
    _, layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    _check(0 <= layer_in_group < layers, "layer_in_group", f"{layer_in_group} is outside 0..{layers - 1}",
           "pass the layer's index within its KV-cache group")
    _check(k.shape == v.shape == (slot_mapping.shape[0], num_kv_heads, head_dim), "k",
           f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit slots {tuple(slot_mapping.shape)} and cache "
           f"heads [{num_kv_heads}, {head_dim}]", "k and v are [T, num_kv_heads, head_dim], one slot per token")
    if not fused_available(kv_cache):
        write_kv_torch(kv_cache, k, v, slot_mapping, layer_in_group, kv_scales)
        return
    kernels = _kernels(interpret_mode())
    npow2 = kernels.next_power_of_2
    plane = block_size * num_kv_heads * head_dim  # elements of one (block, layer, k|v) slice
    pdl = pdl_enabled(kv_cache, slot_mapping.shape[0])
    kernels.write_kv[(slot_mapping.shape[0],)](
        kv_cache, k, v, slot_mapping, num_kv_heads, block_size, layers * 2 * plane, 2 * layer_in_group * plane,
        *k.stride(), *v.stride(), *kv_scales, D=head_dim, D_PAD=npow2(head_dim), H_PAD=npow2(num_kv_heads),
        FP8=kv_cache.dtype == torch.float8_e4m3fn, PDL=pdl,
        num_warps=_num_warps(npow2(num_kv_heads) * head_dim), enable_fp_fusion=False,
        **pdl_kwargs(pdl))


ARGMAX_CHUNK = 2048  # columns a program of argmax_rows reads: 63 programs a row at a 128k vocabulary


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N] long: `logits.argmax(dim=-1)`, the first column of each row's largest value (a NaN counts as
    the largest). On CUDA two launches: the row's chunks in parallel, then the chunks' maxima. torch reduces a
    row with one block of threads, so a step's few rows of a large vocabulary took most of its sampling time (one
    128k row: 27 us on an H200, as long as a layer's attention)."""
    if (logits.dim() != 2 or logits.dtype not in (torch.float16, torch.bfloat16, torch.float32)
            or not _use_triton(logits) or logits.numel() == 0 or logits.stride(1) != 1):
        return logits.argmax(dim=-1)
    rows, vocab = logits.shape
    chunks = -(-vocab // ARGMAX_CHUNK)
    kernels = _kernels(interpret_mode())
    values = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    columns = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    kernels.argmax_chunks[(rows, chunks)](logits, logits.stride(0), vocab, values, columns, chunks,
                                          BLOCK=ARGMAX_CHUNK, num_warps=4)
    kernels.argmax_rows[(rows,)](values, columns, out, chunks, C_PAD=kernels.next_power_of_2(chunks), num_warps=1)
    return out
