"""The paged decode kernel (Triton), built per interpret mode: programs per (decode sequence, KV head, context split).

Each program streams its share of the keys its query can see (the whole context, or the part in
the sliding window) straight from the block-major cache, `tile` tokens per loop iteration: the
tile's rows are gathered through the block table (a tile may span several blocks, or be part of
one), so the loop does the same work for every block size. Scores and the weighted values are
tensor-core products over the whole GQA group at once, [group padded to 16, head_dim] x
[head_dim, tile], with an online softmax in float32; probabilities enter the value product in the
cache dtype, as in FlashAttention (float32 caches use exact float32 products).

The first version walked one 16-token block per iteration with broadcast products: ~0.6 TB/s of
KV on an H200 that streams ~4.2 TB/s (benchmarks/RESULTS.md has the before/after).

With several context ranges (splits) each range writes its partial (weighted values, max, sum), and the last
range of a (sequence, KV head) to finish merges them (a counter per pair, reset by that program). A sequence
whose context needs one range writes its output directly. Launched by triton_decode.py's `paged_decode`.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=2)
def kernel_for(interpret: bool):  # noqa: ANN202 (triton.JITFunctions); keyed by interpret mode
    import triton
    import triton.language as tl

    @triton.jit
    def store_heads(value, out_ptr, s_ptr, rows, heads, d, mask, stride_ot, stride_oh, stride_st, stride_sh,
                    QUANT: tl.constexpr, FMAX: tl.constexpr, INV_FMAX: tl.constexpr):
        # value [G, D] float32, one row of heads a row: the output in out's dtype, or (QUANT) rounded to the
        # activations' dtype and quantized to fp8 per head (one 128-wide group; head_dim is 128), each head's
        # float32 scale at s_ptr (the same float32 operations as quant/activations.py's quant_rows_kernel).
        ptrs = out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
        if QUANT:
            scale = tl.maximum(tl.max(tl.abs(value), axis=1) * INV_FMAX, 1e-12)
            q = tl.clamp(tl.math.div_rn(value, scale[:, None]), -FMAX, FMAX)
            tl.store(ptrs, q.to(out_ptr.dtype.element_ty), mask=mask[:, None])
            tl.store(s_ptr + rows * stride_st + heads * stride_sh, scale, mask=mask)
        else:
            tl.store(ptrs, value.to(out_ptr.dtype.element_ty), mask=mask[:, None])

    # An eager step's block table width (stride_bt) follows its longest sequence: Triton would compile a
    # second variant for widths not divisible by 16 in the middle of serving (~1 s of every stream's time).
    @triton.jit(do_not_specialize=["stride_bt", "stride_st", "stride_sh"])
    def paged_decode_kernel(
        q_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, tokens_ptr, out_ptr, part_ptr, count_ptr, lead_ptr,
        s_ptr, scale, v_scale, window, num_rows, stride_qt, stride_qh, stride_bt, stride_ot, stride_oh,
        stride_st, stride_sh, block_stride, k_offset, v_offset,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
        TILE: tl.constexpr, SPLITS: tl.constexpr, MIN_TILES: tl.constexpr, SHORT_TILES: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr, GROUP_P2: tl.constexpr, SPLIT_CHUNK: tl.constexpr, V_F16: tl.constexpr,
        QK_F16: tl.constexpr, PDL: tl.constexpr, PRELOAD: tl.constexpr, RELEASE: tl.constexpr, EARLY: tl.constexpr,
        STORE: tl.constexpr, QUANT: tl.constexpr, FMAX: tl.constexpr, INV_FMAX: tl.constexpr,
    ):
        # PDL (pdl_enabled): q and the newest token's K/V come from the kernel before. PRELOAD (with PDL): the
        # sequence length, the token and the first tile's block ids load before the wait for it; no kernel right
        # before attention writes those (paged_decode passes it only for a block table it need not copy).
        if PDL and not PRELOAD:
            tl.extra.cuda.gdc_wait()
            if EARLY:
                tl.extra.cuda.gdc_launch_dependents()
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        # The query rows of this program, GROUP heads each: row `seq` and, with ROWS > 1 (a prompt's tokens as
        # rows), up to ROWS - 1 rows after it that name it their lead (lead_ptr): they share its block table, so
        # each K/V tile is loaded once for all of them. A row whose lead is another row is that row's work.
        g = tl.arange(0, GROUP_PAD)
        r = g // GROUP
        rows = seq + r
        if ROWS > 1:
            if tl.load(lead_ptr + seq) != seq:
                return
            maybe = (r < ROWS) & (rows < num_rows)
            row_ok = maybe & (tl.load(lead_ptr + rows, mask=maybe, other=-1) == seq)
            seq_len = tl.load(seq_lens_ptr + rows, mask=row_ok, other=0)  # [G]: per row
            qpos_g = seq_len - 1
            first_g = tl.where(window > 0, tl.maximum(qpos_g - window + 1, 0), 0)
            qpos = tl.max(qpos_g, axis=0)
            first = tl.min(tl.where(row_ok, first_g, qpos), axis=0)
            token = tl.load(tokens_ptr + rows, mask=row_ok, other=0)  # [G]
            q_rows = token[:, None] * stride_qt
        else:
            # One row (a decode): its length and token as scalars. Loaded as [G] vectors and reduced like the rows
            # above, the same kernel over an fp8 cache ran 50% slower in a whole 8B step (H200, 48 x 3072: 110 ->
            # 165 us a layer; RESULTS.md, thirty-fourth session).
            row_ok = r < 1
            qpos = tl.load(seq_lens_ptr + seq) - 1
            first = tl.where(window > 0, tl.maximum(qpos - window + 1, 0), 0)
            q_rows = tl.load(tokens_ptr + seq) * stride_qt
        # This split's tiles [start, stop) of the tiles any row sees, and how many splits have any.
        first_tile = first // TILE
        num_tiles = qpos // TILE + 1 - first_tile
        per_split = tl.maximum(tl.cdiv(num_tiles, SPLITS), tl.where(num_tiles <= SHORT_TILES, 1, MIN_TILES))
        active = tl.cdiv(num_tiles, per_split)
        start = first_tile + split * per_split
        stop = tl.minimum(start + per_split, first_tile + num_tiles)
        d = tl.arange(0, HEAD_PAD)
        d_ok = d < HEAD_DIM
        heads = kv_head * GROUP + g % GROUP
        head_ok = row_ok
        offs = tl.arange(0, TILE)
        table = block_table_ptr + seq * stride_bt
        first_blocks = tl.zeros([TILE], tl.int64)  # unread without PRELOAD
        if PRELOAD:
            kpos = start * TILE + offs
            first_blocks = tl.load(table + kpos // BLOCK_SIZE, mask=(kpos <= qpos) & (kpos >= first),
                                   other=0).to(tl.int64)
            tl.extra.cuda.gdc_wait()
            if EARLY:
                tl.extra.cuda.gdc_launch_dependents()
        # The interpreter's tl.dot multiplies bf16 bit patterns as integers: it takes float32.
        # An fp8 cache is read up to q's dtype (exact for e4m3; V below); its k scale is folded into
        # `scale` and its v scale applied to the accumulator (linear, so partials merge the same).
        # QK_F16 (an fp8 cache, fp8_qk_f16): the key product in float16, whose widening from e4m3 is one
        # instruction per pair (to bf16 four; ncu at 64 x 1024: 9.08M -> 7.49M executed instructions); q is
        # clamped into float16's range, which only a query past 65504 (none seen) would leave.
        dtype = tl.float32 if DOT_FP32 else q_ptr.dtype.element_ty
        q = tl.load(q_ptr + q_rows + heads[:, None] * stride_qh + d[None, :],
                    mask=head_ok[:, None] & d_ok[None, :], other=0.0)  # [G, D]
        if QK_F16:
            dtype = tl.float16
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0)
        q = q.to(dtype)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        denom = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
        head_base = cache_ptr + kv_head * HEAD_DIM + d[None, :]
        for t in range(start, stop):
            kpos = t * TILE + offs
            valid = (kpos <= qpos) & (kpos >= first)
            if PRELOAD:
                later = tl.load(table + kpos // BLOCK_SIZE, mask=valid & (t > start), other=0).to(tl.int64)
                block = tl.where(t > start, later, first_blocks)
            else:
                block = tl.load(table + kpos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            row = (block * block_stride + (kpos % BLOCK_SIZE) * (NUM_KV_HEADS * HEAD_DIM))[:, None]
            kv_mask = valid[:, None] & d_ok[None, :]
            k = tl.load(head_base + k_offset + row, mask=kv_mask, other=0.0).to(dtype)  # [TILE, D]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G, TILE]
            if ROWS > 1:  # each row sees its own causal prefix (and window)
                seen = (kpos[None, :] <= qpos_g[:, None]) & (kpos[None, :] >= first_g[:, None])
                s = tl.where(seen & head_ok[:, None], s, float("-inf"))
            else:
                s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_ref = m_new
            if ROWS > 1:  # a row that has seen no key yet (max -inf) takes exp(-inf) = 0, not exp(nan)
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_ref[:, None])
            alpha = tl.exp(m - m_ref)
            denom = denom * alpha + tl.sum(p, axis=1)
            v = tl.load(head_base + v_offset + row, mask=kv_mask, other=0.0)
            if V_F16:
                # An fp8 V tile, the transposed operand of this product, widened to float16 by an asm
                # instruction the compiler leaves in place: the tile then reaches the tensor cores through
                # 16-bit transposing shared-memory loads. Widened by .to(), the compiler moves the widening
                # past the shared-memory step and reads the fp8 tile from it a byte at a time (48 x 3072 on an
                # H200: 2740 GB/s against 2044). The float16 probabilities round no worse than bf16 ones.
                v16 = tl.inline_asm_elementwise(
                    "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; "
                    "cvt.rn.f16x2.e4m3x2 $1, hi; }",
                    "=r,=r,r", [v.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=False, pack=4)
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v16)
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v.to(dtype), input_precision=PRECISION)
            m = m_new
        if (PDL and not EARLY) or RELEASE:
            # The next kernel's programs start only now: started with this kernel's, they sat on the SMs and
            # slowed it (one H100, 48 x 3072 alone: 207 -> 236 us). RELEASE (pdl_release, a decode batch): this
            # kernel is not launched dependent, the projection after it (model/decode_gemm.py) is. EARLY (batch 1,
            # attention_early): they started right after the wait, and the o projection's GEMV loaded its first
            # weight columns while this kernel's few programs walked their chain of round trips.
            tl.extra.cuda.gdc_launch_dependents()
        acc = acc * v_scale
        # One range: the output itself. Several: partials part[Sd, Hq, SPLITS, HEAD_PAD + 2] = (weighted
        # values, max, sum); the last range of (sequence, KV head) to finish merges them, so no second
        # launch runs (at batch 1 that launch cost as much as the attention of a short context).
        # (Conditions as vector compares: the interpreter rejects masks of a scalar bool broadcast.)
        # QUANT (head_dim 128, no padded columns): out is fp8, each head's scale at s_ptr (store_heads).
        direct = head_ok & ((g * 0 + active) == 1) & ((g * 0 + split) == 0)
        out_dtype = q_ptr.dtype.element_ty
        if QUANT:
            STORE((acc / denom[:, None]).to(out_dtype).to(tl.float32), out_ptr, s_ptr, rows, heads, d, direct,
                  stride_ot, stride_oh, stride_st, stride_sh, QUANT, FMAX, INV_FMAX)
        else:
            tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=direct[:, None] & d_ok[None, :])
        if SPLITS > 1:
            row = ((rows * NUM_KV_HEADS * GROUP + heads) * SPLITS + split) * (HEAD_PAD + 2)  # [G]
            keep = head_ok & ((g * 0 + active) > 1) & ((g * 0 + split) < active)
            tl.store(part_ptr + row[:, None] + d[None, :], acc, mask=keep[:, None] & d_ok[None, :])
            tl.store(part_ptr + row + HEAD_PAD, m, mask=keep)
            tl.store(part_ptr + row + HEAD_PAD + 1, denom, mask=keep)
            if (active > 1) & (split < active):
                # Every warp's partial stores come before the count (the barrier), and the count
                # releases them to the program that reads them (acq_rel at GPU scope).
                tl.debug_barrier()
                counter = count_ptr + seq * NUM_KV_HEADS + kv_head
                arrived = tl.atomic_add(counter, 1, sem="acq_rel")
                if arrived == active - 1:
                    # All GROUP heads at once, SPLIT_CHUNK ranges per load, merged online across chunks
                    # (one chunk for most contexts: a loop over heads here cost a serial L2 round trip each).
                    # (With ROWS > 1: GROUP_P2 covers the heads of every row of the program, hg = row * GROUP + head.)
                    hg = tl.arange(0, GROUP_P2)
                    sc = tl.arange(0, SPLIT_CHUNK)
                    m_all = tl.full([GROUP_P2], float("-inf"), tl.float32)
                    sum_all = tl.zeros([GROUP_P2], tl.float32)
                    out_all = tl.zeros([GROUP_P2, HEAD_PAD], tl.float32)
                    merge_rows = seq + hg // GROUP
                    if ROWS > 1:
                        maybe2 = (hg // GROUP < ROWS) & (merge_rows < num_rows)
                        merge_ok = maybe2 & (tl.load(lead_ptr + merge_rows, mask=maybe2, other=-1) == seq)
                    else:
                        merge_ok = hg < GROUP
                    merge_heads = kv_head * GROUP + hg % GROUP
                    head_rows = (merge_rows * NUM_KV_HEADS * GROUP + merge_heads) * SPLITS  # [G2]
                    for c0 in range(0, active, SPLIT_CHUNK):
                        ok = merge_ok[:, None] & ((c0 + sc)[None, :] < active)  # [G2, SC]
                        base = (head_rows[:, None] + c0 + sc[None, :]) * (HEAD_PAD + 2)
                        part_m = tl.load(part_ptr + base + HEAD_PAD, mask=ok, other=float("-inf"),
                                         cache_modifier=".cg")
                        part_sum = tl.load(part_ptr + base + HEAD_PAD + 1, mask=ok, other=0.0, cache_modifier=".cg")
                        part_acc = tl.load(part_ptr + base[:, :, None] + d[None, None, :],
                                           mask=ok[:, :, None] & d_ok[None, None, :], other=0.0,
                                           cache_modifier=".cg")  # [G2, SC, D]
                        m_new = tl.maximum(m_all, tl.max(part_m, axis=1))
                        m_ref = m_new
                        if ROWS > 1:  # a row none of these ranges saw (its keys are in later ones)
                            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                        alpha = tl.exp(m_all - m_ref)  # (padding heads: NaN, never stored)
                        w = tl.exp(part_m - m_ref[:, None])
                        sum_all = sum_all * alpha + tl.sum(part_sum * w, axis=1)
                        out_all = out_all * alpha[:, None] + tl.sum(part_acc * w[:, :, None], axis=1)
                        m_all = m_new
                    if QUANT:
                        STORE((out_all / sum_all[:, None]).to(out_dtype).to(tl.float32), out_ptr, s_ptr,
                              merge_rows, merge_heads, d, merge_ok, stride_ot, stride_oh, stride_st, stride_sh,
                              QUANT, FMAX, INV_FMAX)
                    else:
                        tl.store(out_ptr + merge_rows[:, None] * stride_ot + merge_heads[:, None] * stride_oh
                                 + d[None, :], (out_all / sum_all[:, None]).to(out_ptr.dtype.element_ty),
                                 mask=merge_ok[:, None] & d_ok[None, :])
                    tl.atomic_xchg(counter, 0)  # ready for the next launch (CUDA graphs replay this buffer)

    paged_decode_kernel.store_heads = store_heads  # handed to it as STORE (the interpreter finds no closures)
    return paged_decode_kernel
