"""CUDA paged decode attention (Triton): programs per (decode sequence, KV head, context split).

Each program streams its share of the keys its query can see (the whole context, or the part in
the sliding window) straight from the block-major cache, `tile` tokens per loop iteration: the
tile's rows are gathered through the block table (a tile may span several blocks, or be part of
one), so the loop does the same work for every block size. Scores and the weighted values are
tensor-core products over the whole GQA group at once, [group padded to 16, head_dim] x
[head_dim, tile], with an online softmax in float32; probabilities enter the value product in the
cache dtype, as in FlashAttention (float32 caches use exact float32 products).

The first version walked one 16-token block per iteration with broadcast products: ~0.6 TB/s of
KV on an H200 that streams ~4.2 TB/s (benchmarks/RESULTS.md has the before/after).

Few sequences give few programs (batch 1 of an 8-KV-head model: 8), so the visible tiles are
split into up to `splits` contiguous ranges, each at least `min_tiles` long (one tile where the
context is at most `short_tiles` tiles); each writes its
partial (weighted values, max, sum), and the last range of a (sequence, KV head) to finish merges
them (a counter per pair, reset by that program). A sequence whose context needs one range writes
its output directly. The split count depends only
on the batch and head counts and the ranges on device values, so a CUDA graph replays it for any
context. Also runs under TRITON_INTERPRET=1 on CPU tensors (tests); the engine uses it on CUDA
only (`paged_decode_available`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.overrides import env_choice, field_override, with_fields
from pdlaunch.model.quant.fp8 import FP8_DTYPE, FP8_MAX, INV_FP8_MAX, Fp8Rows
from pdlaunch.model.split_counters import num_sms as _num_sms  # tests patch triton_decode._num_sms
from pdlaunch.model.split_counters import split_counters

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn)
MAX_SPLITS = 64
MIN_SPLIT_TOKENS = 256  # shorter ranges cost more in partials and merging than they gain ...
# ... except in contexts of up to this many tokens, where one-tile ranges win: batch 1, 1024 tokens, one H100, 4 and
# 8 KV heads, 8.98 -> 7.30 and 10.06 -> 7.94 us a call; 2048 tokens, 4 KV heads, 9.68 -> 9.01; at 4096 they lose,
# 12.62 -> 14.34 (benchmarks/RESULTS.md)
SHORT_SPLIT_CONTEXT = 2048
MERGE_ELEMENTS = 8192  # partial values the merging program loads at once (64 float32 registers a thread)


@lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def paged_decode_setting() -> str:
    """PDLAUNCH_PAGED_DECODE: `auto` (unset or empty) or `torch`; any other value is refused naming the variable."""
    return env_choice("PDLAUNCH_PAGED_DECODE", ("auto", "torch"))


def paged_decode_available(kv_cache: torch.Tensor) -> bool:
    """True when the Triton kernel serves this cache: CUDA, Triton installed, not forced off."""
    if not kv_cache.is_cuda or paged_decode_setting() == "torch" or kv_cache.dtype not in _KERNEL_DTYPES:
        return False
    block_size = kv_cache.shape[3]
    return block_size & (block_size - 1) == 0 and triton_importable()


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1). Triton 3.4 and newer say so
    through `triton.knobs`; before (torch 2.4-2.7 ship Triton 3.0-3.3) only the variable does."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=2)
def _kernels(interpret: bool):  # noqa: ANN202 (triton.JITFunctions); keyed by interpret mode
    import triton
    import triton.language as tl

    @triton.jit
    def store_heads(value, out_ptr, s_ptr, rows, heads, d, mask, stride_ot, stride_oh, stride_st, stride_sh,
                    QUANT: tl.constexpr, FMAX: tl.constexpr, INV_FMAX: tl.constexpr):
        # value [G, D] float32, one row of heads a row: the output in out's dtype, or (QUANT) rounded to the
        # activations' dtype and quantized to fp8 per head (one 128-wide group; head_dim is 128), each head's
        # float32 scale at s_ptr (the same float32 operations as quant/kernels.py's quant_rows_kernel).
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


# Programs of one launch over an fp8 cache resident on an SM at once, by tile (head_dim 128, 4 warps, 2 stages):
# the waves the timings of benchmarks/fp8_decode_tiles.py step by on Hopper (132 SMs).
FP8_RESIDENT = {64: 4, 128: 3}


def _wave_fill(programs: int, slots: int) -> float:
    """The share of the SM slots that `programs` keep busy over the waves they take."""
    return programs / (-(-programs // slots) * slots)


@dataclass(frozen=True)
class DecodeLaunch:
    """How one paged_decode call is cut: tokens per loop iteration, context ranges, Triton knobs. A context of
    at most `short_tiles` tiles splits into ranges of one tile, a longer one into ranges of `min_tiles` or more."""

    tile: int
    splits: int
    min_tiles: int
    num_warps: int
    num_stages: int
    short_tiles: int = 0


@lru_cache(maxsize=8)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


T = TypeVar("T")


def device_entry(table: Mapping[str, T], name: str, default: T) -> T:
    """The entry of a per-device launch table whose key (a substring of torch's device name) `name` contains, the
    first in the table's order; `default` where none does."""
    return next((entry for key, entry in table.items() if key in name), default)


@lru_cache(maxsize=8)
def device_name(device_index: int) -> str:
    """torch's name of CUDA device `device_index`, looked up once: the key of the per-device launch tables
    (gemv.GEMV_DEVICE_CONFIGS, quant/kernels.GEMV_SHAPE_CONFIGS), read on every eager one-row projection."""
    return torch.cuda.get_device_name(device_index)


def pdl_enabled(t: torch.Tensor, rows: int) -> bool:
    """True when a kernel computing `rows` token rows on `t`'s device launches with programmatic dependent
    launch (CUDA, sm_90 or newer): its programs may start while the kernel before it in the stream finishes, do
    what needs none of that kernel's output (load weights), then wait for it (`gdc_wait`) before touching
    anything it wrote. Every kernel launched so waits, and lets the next one start only after its own wait, so
    when a kernel starts, all but the one before it have finished.

    One row only: the batch-1 decode step, where every kernel is ours and each is short, so the launch gaps were
    a tenth of the step (H200, 8B shape, 1 x 128: 4.41 -> 4.11 ms). From two rows the projections run through
    cuBLAS, whose GEMMs let the next kernel start early; ours then waited on SMs the GEMM still needed (H200,
    48 x 3072: 9.54 -> 9.82 ms). From two rows only the GEMMs that follow a kernel releasing them
    (`pdl_release`) launch dependent. PDLAUNCH_PDL=off turns it off (debugging, benchmarks); PDLAUNCH_PDL=all
    launches every kernel of ours dependent at any row count (A/B runs)."""
    return t.is_cuda and (rows == 1 or pdl_setting() == "all") and _pdl_device(t)


def pdl_setting() -> str:
    """PDLAUNCH_PDL: `auto` (unset or empty), `off` or `all` (pdl_enabled); any other value is refused naming the
    variable."""
    return env_choice("PDLAUNCH_PDL", ("auto", "off", "all"))


def attention_early() -> bool:
    """A batch-1 paged decode (launched dependent) lets the o projection after it start right after its own wait,
    not after its loop: the projection's programs load their first weight columns while the attention's few
    programs walk their chain of round trips (Qwen3-30B-A3B shape, one H100, batch 1: 3.27 -> 3.23 ms a step;
    benchmarks/RESULTS.md). PDLAUNCH_ATTN_EARLY=off keeps the release after the loop (A/B runs, debugging); values other
    than on and off are refused."""
    return env_choice("PDLAUNCH_ATTN_EARLY", ("on", "off")) == "on"


def pdl_release(t: torch.Tensor, rows: int) -> bool:
    """True when a kernel computing a decode batch of `rows` (two or more) token rows on `t`'s device lets the
    kernel after it start early, without itself being launched dependent: the RMSNorm before a batch's SwiGLU GEMM
    (model/swiglu.py) or projection GEMM (model/decode_gemm.py), the paged decode before the o projection, the
    SwiGLU GEMM before the down projection. Those GEMMs are launched dependent (on this same condition) and wait
    for the kernel before them before reading x. A kernel not launched dependent (cuBLAS's GEMMs) ignores the
    release. PDLAUNCH_PDL=off turns it off with the batch-1 launches."""
    return rows > 1 and _pdl_device(t)


def _pdl_device(t: torch.Tensor) -> bool:
    """`t`'s device can launch dependent kernels (CUDA sm_90 or newer, a Triton with the launch option, compiled
    kernels) and PDLAUNCH_PDL is not off."""
    return (t.is_cuda and pdl_setting() != "off"
            and _capability(t.device.index or 0) >= (9, 0) and _triton_has_pdl() and not interpret_mode())


def pdl_kwargs(pdl: bool) -> dict[str, bool]:
    """The launch keyword for a dependent launch, and none for a plain one: a Triton without the option (before
    3.3) rejects launch keywords it does not know."""
    return {"launch_pdl": True} if pdl else {}


@lru_cache(maxsize=1)
def _triton_has_pdl() -> bool:
    """The installed Triton has the launch option and the two instructions (3.3 and newer)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda
    except ImportError:
        return False
    return ("launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
            and hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents"))


def _has_fp8_convert(device: torch.device) -> bool:
    """cvt.rn.f16x2.e4m3x2 (PTX 7.8) needs sm_89 or newer."""
    return device.type == "cuda" and _capability(device.index or 0) >= (8, 9)


def fp8_qk_f16() -> bool:
    """Over an fp8 cache widened by the hardware (V_F16), the key product runs in float16 too (the e4m3
    widening is one instruction per pair, as for the values): on an H200 the kernel alone went 113.6 -> 100.2 us
    at 48 x 3072 (8 KV heads) and 36.5 -> 32.5 us at 64 x 1024 (4), with the same error against float64
    (RESULTS.md, thirty-fourth session). PDLAUNCH_FP8_QK=bf16 keeps the bf16 product (A/B runs); values other than
    f16 and bf16 are refused."""
    return env_choice("PDLAUNCH_FP8_QK", ("f16", "bf16")) == "f16"


def choose_launch(num_seqs: int, num_kv_heads: int, head_dim: int, num_sms: int, waves: int = 2,
                  element_size: int = 2) -> DecodeLaunch:
    """Splits: enough (sequence, KV head, range) programs for `waves` programs per SM, a power of
    two <= MAX_SPLITS; each range at least MIN_SPLIT_TOKENS long. Depends on the batch, head
    counts, cache element size and device only, so a CUDA graph captured for this batch serves
    every context."""
    programs = max(1, num_seqs * num_kv_heads)
    # Measured on an H100 (benchmarks/decode_sweep.py): 64-token tiles, two stages, when the
    # programs fill the SMs twice; with fewer, each streams more at once: 128-token tiles
    # (1 x 8000: 2570 GB/s against 1860 with 64, timed with that context in L2; read from memory, every
    # tile and split takes 21-23 us there: a fixed ~7 us a call plus 80% of copy bandwidth). A 1-byte
    # (fp8) cache moves half the bytes per token: twice the tokens per tile keep the bytes per loop
    # iteration (up to 128 tokens of 128).
    tile = (64 if head_dim <= 128 else 32) * (2 if programs < 2 * num_sms else 1)
    if element_size == 1:
        wide = max(tile, min(2 * tile, 128 * 128 // max(head_dim, 128)))
        # Except where the programs fill the SMs' slots for 64-token tiles in fewer, fuller waves than for
        # 128-token ones (FP8_RESIDENT): e.g. 512 programs on 132 SMs are 1.3 waves of the 128-token tile but
        # one of the 64-token one, which was 17-19% faster at 64 x 1024-3072 (8 KV heads) and 128 x 1024-4096
        # (4 KV heads) on an H200 and an H100; at 384, 640 and 768 programs the 128-token tile stays faster
        # (benchmarks/fp8_decode_tiles.py, benchmarks/RESULTS.md).
        narrow_wins = (head_dim == 128 and wide == 2 * tile
                       and _wave_fill(programs, FP8_RESIDENT[tile] * num_sms)
                       > _wave_fill(programs, FP8_RESIDENT[wide] * num_sms))
        tile = tile if narrow_wins else wide
    # Programs that fill every SM once run unsplit: Qwen3-30B-A3B's 64 x 1024 (256 programs, 4 KV heads) streamed
    # 3637 GB/s in one range of 128-token tiles against 2971 in two of 64 on an H200 (benchmarks/decode_gqa.py).
    wanted = -(-waves * num_sms // programs) if programs < num_sms else 1
    splits = min(MAX_SPLITS, 1 << (wanted - 1).bit_length()) if wanted > 1 else 1
    return DecodeLaunch(tile=tile, splits=splits, min_tiles=max(1, MIN_SPLIT_TOKENS // tile),
                        num_warps=4, num_stages=2, short_tiles=SHORT_SPLIT_CONTEXT // tile if splits > 1 else 0)


_LAUNCH_FIELDS = {"tile": int, "splits": int, "min_tiles": int, "num_warps": int, "num_stages": int,
                  "short_tiles": int, "max_seqs": int}


@lru_cache(maxsize=8)
def launch_override(setting: str) -> dict[str, int | bool]:
    """PDLAUNCH_DECODE_LAUNCH, `field=value:field=value` (e.g. `tile=64:max_seqs=1`): DecodeLaunch fields that
    replace choose_launch's for every call of at most `max_seqs` sequences (default: every call), so a benchmark
    can time a launch inside whole steps (moe_speed.py --variants). tile (16 to 256), splits (up to MAX_SPLITS)
    and warps are powers of two; short_tiles may be 0 (no short contexts split into one-tile ranges)."""
    fields = field_override("PDLAUNCH_DECODE_LAUNCH", setting, _LAUNCH_FIELDS,
                            frozenset({"tile", "splits", "num_warps"}), "launch", "tile=64:max_seqs=1",
                            zero_ok=frozenset({"short_tiles"}))
    if not 16 <= int(fields.get("tile", 16)) <= 256 or int(fields.get("splits", 1)) > MAX_SPLITS:
        raise PdlaunchError(f"PDLAUNCH_DECODE_LAUNCH: {setting!r}: tile must be 16 to 256 and splits at most "
                            f"{MAX_SPLITS}", field="PDLAUNCH_DECODE_LAUNCH", hint="e.g. tile=64:max_seqs=1")
    return fields


def with_override(launch: DecodeLaunch, num_seqs: int) -> DecodeLaunch:
    """`launch` with PDLAUNCH_DECODE_LAUNCH's fields in place of its own when the call has at most its
    max_seqs sequences (launch_override)."""
    return with_fields(launch, launch_override(os.environ.get("PDLAUNCH_DECODE_LAUNCH", "")), num_seqs, "max_seqs")


def launch_batch_sizes(max_num_seqs: int, num_kv_heads: int, head_dim: int, device: torch.device,
                       element_size: int = 2) -> list[int]:
    """The smallest batch size of each distinct launch `choose_launch` gives for 1..max_num_seqs
    sequences: running these once compiles every variant an eager decode of up to max_num_seqs launches."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 16
    seen: dict[DecodeLaunch, int] = {}
    for n in range(1, max_num_seqs + 1):
        seen.setdefault(choose_launch(n, num_kv_heads, head_dim, sms, element_size=element_size), n)
    return sorted(seen.values())


def rows_per_program(num_heads: int, num_kv_heads: int) -> int:
    """How many query rows of one sequence a program of `paged_decode` with `leads` computes together: as many
    as fill the 16 rows the tensor-core product pads a GQA group to (8B's group of 4: 4 rows), so a decode
    row's program does the same work as without leads."""
    group = num_heads // num_kv_heads
    return max(1, 16 // group) if group <= 16 else 1


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, layer_in_group: int, tokens: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, window: int | None,
                 scale: float, launch: DecodeLaunch | None = None,
                 kv_scales: tuple[float, float] = (1.0, 1.0), leads: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, Hq, D]; tokens/seq_lens: [Sd]; block_table: [Sd, max_blocks] -> [Sd, Hq, D].
    kv_scales: (k_scale, v_scale) of an fp8 cache (ignored for other dtypes).
    leads: [Sd], each row's lead row: the first of up to `rows_per_program` consecutive rows with the same block
    table (a prompt's tokens as rows, runner/cuda_graphs.py) whose program computes them all, loading each K/V
    tile once for the group; a row that leads itself alone is a decode. None: every row alone."""
    out = _paged_decode(q, kv_cache, layer_in_group, tokens, block_table, seq_lens, window, scale, launch, kv_scales,
                        leads, None)
    assert isinstance(out, torch.Tensor)
    return out


def paged_decode_fp8(q: torch.Tensor, kv_cache: torch.Tensor, layer_in_group: int, tokens: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor, window: int | None, scale: float,
                     column_major: bool, kv_scales: tuple[float, float] = (1.0, 1.0),
                     leads: torch.Tensor | None = None, launch: DecodeLaunch | None = None) -> Fp8Rows:
    """paged_decode, its output [Sd, Hq * 128] quantized in the same kernel for a block-FP8 o projection: fp8
    with one float32 scale a head (head_dim 128: a head is one 128-column group), the values quantize_rows gives
    for paged_decode's output (quant/kernels.py `fp8_input_layout` says the scales' layout). `launch` as
    paged_decode's."""
    out = _paged_decode(q, kv_cache, layer_in_group, tokens, block_table, seq_lens, window, scale, launch, kv_scales,
                        leads, column_major)
    assert isinstance(out, Fp8Rows)
    return out


def _paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, layer_in_group: int, tokens: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor, window: int | None, scale: float,
                  launch: DecodeLaunch | None, kv_scales: tuple[float, float], leads: torch.Tensor | None,
                  fp8: bool | None) -> torch.Tensor | Fp8Rows:
    """paged_decode, or (`fp8` not None) paged_decode_fp8 with its scales column-major when True."""
    if kv_cache.dtype != torch.float8_e4m3fn:
        kv_scales = (1.0, 1.0)
    import triton

    num_blocks, layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    num_seqs = tokens.shape[0]
    rows = rows_per_program(num_heads, num_kv_heads) if leads is not None else 1
    if launch is None:
        sms = _num_sms(q.device.index or 0) if q.is_cuda else 16
        launch = with_override(choose_launch(num_seqs, num_kv_heads, head_dim, sms,
                                             element_size=kv_cache.element_size()), num_seqs)
    rows_out = None
    if fp8 is None:
        out = scales = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    else:
        if head_dim != 128:
            raise ValueError(f"fp8 attention output needs head_dim 128 (one 128-column group a head), got {head_dim}")
        out = torch.empty(num_seqs, num_heads, head_dim, dtype=FP8_DTYPE, device=q.device)
        scales = (torch.empty(num_heads, num_seqs, dtype=torch.float32, device=q.device).t() if fp8
                  else torch.empty(num_seqs, num_heads, dtype=torch.float32, device=q.device))
        rows_out = Fp8Rows(out.view(num_seqs, num_heads * head_dim), scales, fp8, q.dtype)
    pdl = pdl_enabled(q, num_seqs)
    # A table that needs a copy would be written by the kernel right before this one: read it after the wait.
    preload = pdl and block_table.is_contiguous()
    block_table = block_table.contiguous()
    plane = block_size * num_kv_heads * head_dim  # elements of one (layer, k|v) slice of a block
    head_pad = max(16, triton.next_power_of_2(head_dim))
    part, counts = out, seq_lens  # unused with one range
    if launch.splits > 1:
        part = torch.empty(num_seqs, num_heads, launch.splits, head_pad + 2, dtype=torch.float32, device=q.device)
        counts = split_counters(q.device, num_seqs * num_kv_heads)
    interpret = interpret_mode()
    decode_kernel = _kernels(interpret)
    v_f16 = kv_cache.dtype == torch.float8_e4m3fn and not interpret and _has_fp8_convert(q.device)
    group_p2 = triton.next_power_of_2(group * rows)  # the heads of a program's rows, for its merge
    decode_kernel[(num_seqs, num_kv_heads, launch.splits)](
        q, kv_cache, block_table, seq_lens, tokens, out, part, counts, leads if leads is not None else tokens,
        scales, scale * kv_scales[0], kv_scales[1], window or 0, num_seqs, q.stride(0), q.stride(1),
        block_table.stride(0), out.stride(0), out.stride(1), scales.stride(0), scales.stride(1),
        layers * 2 * plane, (2 * layer_in_group) * plane, (2 * layer_in_group + 1) * plane,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), ROWS=rows,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEAD_PAD=head_pad, TILE=launch.tile, SPLITS=launch.splits,
        MIN_TILES=launch.min_tiles, SHORT_TILES=launch.short_tiles,
        PRECISION="ieee" if q.dtype == torch.float32 or interpret else "tf32",
        DOT_FP32=interpret, GROUP_P2=group_p2,
        SPLIT_CHUNK=max(1, min(launch.splits, MERGE_ELEMENTS // (group_p2 * head_pad))),
        V_F16=v_f16, QK_F16=v_f16 and fp8_qk_f16(),
        PDL=pdl, PRELOAD=preload, RELEASE=not pdl and pdl_release(q, num_seqs),
        EARLY=pdl and attention_early(), num_warps=launch.num_warps,
        STORE=decode_kernel.store_heads, QUANT=fp8 is not None, FMAX=FP8_MAX, INV_FMAX=INV_FP8_MAX,
        num_stages=launch.num_stages, **pdl_kwargs(pdl),
    )
    return out if rows_out is None else rows_out
