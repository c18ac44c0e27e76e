"""The Triton kernels of the fused ops (fused_ops.py, fused_norm.py, fused_rotary.py), built per interpret mode.

Kernels are CUDA-graph capturable: outputs are sized from input shapes only, there is no host
sync, and write_kv skips slot < 0 with a store mask rather than a host-side filter.
Kernels are built lazily per interpret mode because Triton reads TRITON_INTERPRET when
`@triton.jit` decorates, not when a kernel launches; its own library helpers (tl.sum) are
decorated at `import triton`, so the interpreter needs the variable set before that import.
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

from pdlaunch.model.triton_env import interpret_mode


@lru_cache(maxsize=2)
def kernels_for(interpret: bool) -> SimpleNamespace:
    """The Triton kernels, decorated in the given interpret mode (the cache key keeps modes apart)."""
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_groups(y, q_ptr, s_ptr, width, stride_sg, BLOCK: tl.constexpr, FMAX: tl.constexpr,
                        INV_FMAX: tl.constexpr):
        # BLOCK float32 values of a row (already rounded to the activations' dtype) as fp8 from q_ptr, in groups of
        # 128 columns, the first `width` of them stored, each group's scale at s_ptr + group * stride_sg: the same
        # float32 operations as quant/activations.py's quant_rows_kernel, so the values are equal to its.
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
        if PDL:  # pdl.pdl_enabled
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        elif RELEASE:  # pdl.pdl_release: a decode batch's SwiGLU GEMM after this kernel may start
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
        if PDL:  # pdl.pdl_enabled
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
        if PDL:  # pdl.pdl_enabled
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
        if PDL:  # pdl.pdl_enabled
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
    helper = kernels_for(interpret).normalize
    if interpret:  # the interpreter makes triton.language visible to this module's functions when it rewrites one;
        helper.rewrite()  # a callee of another module's kernel is checked for it before it is rewritten
    return helper
