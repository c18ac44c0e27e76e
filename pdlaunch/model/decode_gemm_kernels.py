"""The Triton kernels of a decode batch's projection GEMM (decode_gemm.py launches them), built per interpret mode.

Each program streams BLOCK_N weight rows over a range of K (SPLIT_K ranges where the N tiles alone leave SMs idle),
loads its first weight tile before it waits for x (`gdc_wait`, the kernel before computes x), and lets the next kernel
start when its loop is done. With several ranges each writes a float32 partial and the last range of an N tile to
finish adds them in range order (deterministic; the counters of model/split_counters.py), then rounds once, as cuBLAS
rounds: `split_store`, also the epilogue of quant/split_gemm.py's block-FP8 split GEMM. `tma_gemm_kernel` runs the
same product with every tile read by the tensor-memory accelerator through host-made descriptors
(benchmarks/tma_gemm_speed.py).
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace


@lru_cache(maxsize=2)
def kernels_for(interpret: bool) -> SimpleNamespace:
    """The kernel (`gemm`) and the epilogue of a GEMM split over K (`split_store`, also quant/split_gemm.py's block-FP8
    split GEMM's), built per interpret mode (Triton reads TRITON_INTERPRET when it decorates)."""
    import triton
    import triton.language as tl

    # Handed to the kernels as STORE (a constexpr; model/fused_ops.py says why): writes the [BLOCK_M, BLOCK_N]
    # float32 `acc` of rows rm and columns rn (+ the bias) to y, rounded once. With SPLIT_K ranges each stores its
    # partial [SPLIT_K, BLOCK_M, N], and the last range of its N tile to finish adds them in range order
    # (deterministic), then resets the tile's counter (model/split_counters.py).
    @triton.jit
    def split_store(acc, y_ptr, b_ptr, part_ptr, count_ptr, rm, rn, M, N, pid_n, split, BLOCK_M: tl.constexpr,
                    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
        y = y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
        n_ok = rn < N
        out_mask = (rm < M)[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            tile = (rm[:, None] * N + rn[None, :]).to(tl.int64)
            plane = BLOCK_M * N
            tl.store(part_ptr + split * plane + tile, acc, mask=out_mask)
            # Every warp's partial is stored before the count (the barrier); the count releases them to the
            # program that adds them (acq_rel at GPU scope), which reads them past L1 (.cg).
            tl.debug_barrier()
            counter = count_ptr + pid_n
            if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
                total = tl.zeros_like(acc)
                for s in range(SPLIT_K):
                    total += tl.load(part_ptr + s * plane + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(y, total.to(y_ptr.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(counter, 0)  # ready for the next launch (CUDA graphs replay this buffer)

    # A batch's row count is not specialized on (divisible by 16 or not): one compiled variant per BLOCK_M serves
    # every row count the start-up warm-up's prompts of 2, 4 ... 64 tokens reach, so none compiles while serving.
    @triton.jit(do_not_specialize=["M"])
    def decode_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K, sx_m, k_per_split,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           SPLIT_K: tl.constexpr, SWAP: tl.constexpr, EVEN_K: tl.constexpr,
                           HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr, STORE: tl.constexpr):
        # x [M, K] (rows sx_m apart), w [N, K] contiguous, y [M, N] contiguous; grid (cdiv(N, BLOCK_N), SPLIT_K),
        # M <= BLOCK_M. Range `split` covers K columns [split * k_per_split, min(K, (split + 1) * k_per_split)).
        # EVEN_K: K and k_per_split are multiples of BLOCK_K (no column masks). STORE: split_store.
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        k_start = split * k_per_split
        k_stop = tl.minimum(k_start + k_per_split, K)
        if SWAP:  # y^T = W x^T: the weight tile is the MMA's M side (64+ rows take Hopper's wgmma), x^T its N side
            w = w_ptr + rn[:, None].to(tl.int64) * K + k_start + rk[None, :]  # [BLOCK_N, BLOCK_K]
            x = x_ptr + rm[None, :].to(tl.int64) * sx_m + k_start + rk[:, None]  # [BLOCK_K, BLOCK_M]
            w_rows = n_ok[:, None]
            x_rows = m_ok[None, :]
        else:
            w = w_ptr + rn[None, :].to(tl.int64) * K + k_start + rk[:, None]  # [BLOCK_K, BLOCK_N] view of W^T
            x = x_ptr + rm[:, None].to(tl.int64) * sx_m + k_start + rk[None, :]  # [BLOCK_M, BLOCK_K]
            w_rows = n_ok[None, :]
            x_rows = m_ok[:, None]
        # The weight's first tile loads while the kernel before (which computes x) ends; weights are written only
        # by loading and waking, never by a kernel of the step.
        if EVEN_K:
            w_first = tl.load(w, mask=w_rows, other=0.0)
        elif SWAP:
            w_first = tl.load(w, mask=w_rows & (rk < k_stop - k_start)[None, :], other=0.0)
        else:
            w_first = tl.load(w, mask=w_rows & (rk < k_stop - k_start)[:, None], other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        if EVEN_K:
            xv = tl.load(x, mask=x_rows, other=0.0)
        elif SWAP:
            xv = tl.load(x, mask=x_rows & (rk < k_stop - k_start)[:, None], other=0.0)
        else:
            xv = tl.load(x, mask=x_rows & (rk < k_stop - k_start)[None, :], other=0.0)
        if DOT_F32:  # the interpreter multiplies bf16 tiles wrongly; widened, the products are the same
            xv = xv.to(tl.float32)
            w_first = w_first.to(tl.float32)
        if SWAP:
            acc = tl.dot(w_first, xv, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(xv, w_first, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), input_precision="ieee")
        for k0 in range(k_start + BLOCK_K, k_stop, BLOCK_K):
            w += BLOCK_K
            x += BLOCK_K
            if EVEN_K:
                xv = tl.load(x, mask=x_rows, other=0.0)
                wv = tl.load(w, mask=w_rows, other=0.0)
            elif SWAP:
                k_ok = rk < k_stop - k0
                xv = tl.load(x, mask=x_rows & k_ok[:, None], other=0.0)
                wv = tl.load(w, mask=w_rows & k_ok[None, :], other=0.0)
            else:
                k_ok = rk < k_stop - k0
                xv = tl.load(x, mask=x_rows & k_ok[None, :], other=0.0)
                wv = tl.load(w, mask=w_rows & k_ok[:, None], other=0.0)
            if DOT_F32:
                xv = xv.to(tl.float32)
                wv = wv.to(tl.float32)
            if SWAP:
                acc = tl.dot(wv, xv, acc, input_precision="ieee")
            else:
                acc = tl.dot(xv, wv, acc, input_precision="ieee")
        if PDL:
            # The next kernel's programs start only now: started with these, they would wait on the SMs this
            # grid's later programs need.
            tl.extra.cuda.gdc_launch_dependents()
        if SWAP:
            acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
        STORE(acc, y_ptr, b_ptr, part_ptr, count_ptr, rm, rn, M, N, pid_n, split, BLOCK_M, SPLIT_K, HAS_BIAS)

    # The same product with x and the weight read by the tensor-memory accelerator: each [rows, BLOCK_K] and
    # [BLOCK_N, BLOCK_K] tile is one TMA copy into shared memory through a host-made descriptor (rows past M and
    # columns past K read as zeros), the pipeliner keeps STAGES of them in flight, and the products are warpgroup
    # MMAs. k_per_split is a multiple of BLOCK_K, so no tile crosses a range's end.
    @triton.jit(do_not_specialize=["M"])
    def tma_gemm_kernel(x_desc, w_desc, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K, k_per_split,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr, SWAP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                        STAGES: tl.constexpr, PDL: tl.constexpr, STORE: tl.constexpr):
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        off_n = pid_n * BLOCK_N
        k_start = split * k_per_split
        k_stop = tl.minimum(k_start + k_per_split, K)
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()
        for k0 in tl.range(k_start, k_stop, BLOCK_K, num_stages=STAGES):
            wv = w_desc.load([off_n, k0])
            xv = x_desc.load([0, k0])
            if DOT_F32:
                wv = wv.to(tl.float32)
                xv = xv.to(tl.float32)
            if SWAP:
                acc = tl.dot(wv, xv.T, acc, input_precision="ieee")
            else:
                acc = tl.dot(xv, wv.T, acc, input_precision="ieee")
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        if SWAP:
            acc = tl.trans(acc)
        rm = tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        STORE(acc, y_ptr, b_ptr, part_ptr, count_ptr, rm, rn, M, N, pid_n, split, BLOCK_M, SPLIT_K, HAS_BIAS)

    return SimpleNamespace(gemm=decode_gemm_kernel, split_store=split_store, tma_gemm=tma_gemm_kernel)


def split_store(interpret: bool):  # noqa: ANN201 (a triton.JITFunction)
    """The epilogue of a GEMM split over K (see `kernels_for`), for another module's split GEMM to take as its STORE
    constexpr (quant/split_gemm.py's block-FP8 one), built in the given interpret mode."""
    return kernels_for(interpret).split_store
