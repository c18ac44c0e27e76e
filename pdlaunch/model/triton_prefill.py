"""CUDA paged prefill attention (Triton): every prompt chunk of a step in one launch a layer.

A step that computes prompt tokens next to running decodes (chunked prefill in a colocated instance, a prompt
spilled to a decode instance) runs piecewise CUDA graphs with the attention eager between the pieces
(runner/mixed_graphs.py). The torch path of model/attention.py pays for each chunk with cached context a gather
of its keys and values out of the cache, a causal mask object and scaled_dot_product_attention's dispatch: about
375 us of host a layer, 12 ms a step of an 8B model, as much as the GPU's work for a 360-token chunk beside 16
decodes (benchmarks/RESULTS.md). Under a loaded server's interpreter lock such a step became host-bound.

`paged_prefill` computes all prompt rows of a step of at most PAGED_PREFILL_MAX_TOKENS prompt tokens that also
runs decodes or continues a prompt over cached keys (the chunk caps that keep decodes' TPOT, bench compare's
advisor; shorter prompts of up to 128 tokens run as decode-graph rows, runner/cuda_graphs.py; a step of fresh
prompts alone keeps SDPA) in one launch instead: programs per (tile, KV head), a tile
being up to `block_q` consecutive tokens of one prompt (`prefill_tiles`, built once a step on the host), each
program the tile's tokens x the GQA group's heads as the rows of one tensor-core product. The keys come straight
from the block-major cache through the block table, BLOCK_N tokens a loop iteration, causal to each row's
position (`kpos <= qpos`; the chunk's own keys were written to the cache before) and within a sliding window
when the layer has one; an online softmax in float32, the probabilities entering the value product in the cache
dtype (FlashAttention's order). An fp8 cache is read up to the query's dtype, its k scale folded into the softmax
scale and its v scale applied to the accumulator, as triton_decode's kernel does.

Also runs under TRITON_INTERPRET=1 on CPU tensors (tests); the engine uses it on CUDA only
(`paged_prefill_available`). PDLAUNCH_PAGED_PREFILL=torch keeps the torch path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.overrides import env_choice, whole_number
from pdlaunch.model.triton_decode import paged_decode_available
from pdlaunch.model.triton_env import interpret_mode

# Steps with more prompt tokens than this keep scaled_dot_product_attention: there the GPU's work sets the step
# time, and this kernel's products run slower than SDPA's flash kernel. One H200, 8B shape, a 3072-token prompt's
# chunk steps beside 16 decodes back to back (benchmarks/chunk_step.py): 360-token chunks 15.82 -> 13.78 ms a step
# with the kernel, 1024-token chunks 29.70 -> 30.8-32.6 ms under six launches; a prompt alone in chunks of 2048 and
# 1024 tokens 47.4 + 31.5 -> 51.4 + 33.9 ms (benchmarks/RESULTS.md). The crossover is about 750 tokens.
PAGED_PREFILL_MAX_TOKENS = 512


@dataclass(frozen=True)
class PrefillLaunch:
    """Tokens of one prompt a program computes (`block_q`; its rows are those tokens x the GQA group padded to a
    power of 2), keys a loop iteration, warps (0: 4 up to 64 rows, 8 above), pipeline stages."""

    block_q: int = 16
    block_n: int = 64
    num_warps: int = 0
    num_stages: int = 2

    def rows(self, group: int) -> int:
        """A program's rows: block_q tokens x the group's heads (padded), at least the 16 a tensor-core product
        takes."""
        return max(16, self.block_q * _pow2(group))

    def warps(self, group: int) -> int:
        return self.num_warps or (4 if self.rows(group) <= 64 else 8)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


_LAUNCH_FIELDS = ("block_q", "block_n", "num_warps", "num_stages")


def prefill_launch() -> PrefillLaunch:
    """The launch: PrefillLaunch's defaults, or PDLAUNCH_PREFILL_LAUNCH=`block_q,block_n,num_warps,num_stages`
    (benchmarks time launches inside whole steps with it)."""
    return _launch(os.environ.get("PDLAUNCH_PREFILL_LAUNCH", ""))


@lru_cache(maxsize=4)
def _launch(setting: str) -> PrefillLaunch:
    if not setting:
        return PrefillLaunch()
    parts = setting.split(",")
    values = [int(p) if whole_number(p.strip()) else -1 for p in parts]
    fits = (len(values) == len(_LAUNCH_FIELDS) and all(v > 0 and v & (v - 1) == 0 for v in values[:2])
            and values[2] in (0, 1, 2, 4, 8, 16) and values[1] >= 16 and values[3] >= 1)
    if not fits:
        raise PdlaunchError(f"PDLAUNCH_PREFILL_LAUNCH={setting!r} is not a launch", field="PDLAUNCH_PREFILL_LAUNCH",
                            hint="give block_q,block_n,num_warps,num_stages, e.g. 16,64,4,2 (block sizes powers of "
                                 "2, block_n at least 16; num_warps 0 for the default), or unset it")
    return PrefillLaunch(*values)


def paged_prefill_available(kv_cache: torch.Tensor) -> bool:
    """True when `paged_prefill` serves this cache's prompt steps (model/attention_plan.py build_group_plan): on CUDA
    where the paged decode kernel does; PDLAUNCH_PAGED_PREFILL=torch turns it off, `triton` also takes CPU tensors
    under TRITON_INTERPRET=1 (tests)."""
    if not kv_cache.is_cuda and not interpret_mode():
        return False  # a CPU instance: the torch path, whatever the variable says (its steps never reach a GPU)
    choice = paged_prefill_setting()
    if choice == "torch":
        return False
    if choice == "triton" and not kv_cache.is_cuda:
        return interpret_mode() and kv_cache.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return paged_decode_available(kv_cache)


def paged_prefill_setting() -> str:
    """PDLAUNCH_PAGED_PREFILL: `auto` (unset or empty), `torch` or `triton`; any other value is refused naming the
    variable."""
    return env_choice("PDLAUNCH_PAGED_PREFILL", ("auto", "torch", "triton"))


def prefill_tiles(q_starts: list[int], q_lens: list[int], ctx_lens: list[int], seq_ids: list[int],
                  block_q: int) -> list[tuple[int, int, int, int]]:
    """The tiles of a step's prompt chunks: (first query row, rows, the first row's position, sequence index)
    for every `block_q` tokens of each chunk (its last tile shorter)."""
    tiles: list[tuple[int, int, int, int]] = []
    for start, qlen, ctx, seq in zip(q_starts, q_lens, ctx_lens, seq_ids, strict=True):
        for off in range(0, qlen, block_q):
            tiles.append((start + off, min(block_q, qlen - off), ctx + off, seq))
    return tiles


@lru_cache(maxsize=2)
def _kernels(interpret: bool):  # noqa: ANN202 (a triton.JITFunction); keyed by interpret mode
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["stride_bt", "window"])
    def paged_prefill_kernel(
        q_ptr, cache_ptr, block_table_ptr, tiles_ptr, out_ptr, scale, v_scale, window,
        stride_qt, stride_qh, stride_bt, stride_ot, stride_oh, block_stride, k_offset, v_offset,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, WINDOW: tl.constexpr,
    ):
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        q_start = tl.load(tiles_ptr + tile * 4)
        rows = tl.load(tiles_ptr + tile * 4 + 1)
        pos0 = tl.load(tiles_ptr + tile * 4 + 2)
        seq = tl.load(tiles_ptr + tile * 4 + 3).to(tl.int64)
        # Row r: token r // GROUP_PAD of the tile (a tile's row of tiles_ptr: first query row, tokens, the first
        # token's position, sequence index), head kv_head * GROUP + r % GROUP_PAD (padding heads and tokens unused).
        r = tl.arange(0, ROWS)
        token = r // GROUP_PAD
        head = kv_head * GROUP + r % GROUP_PAD
        row_ok = (token < rows) & (r % GROUP_PAD < GROUP)
        qpos = pos0 + token
        d = tl.arange(0, HEAD_PAD)
        d_ok = d < HEAD_DIM
        q_rows = (q_start + token).to(tl.int64)
        dtype = tl.float32 if DOT_FP32 else q_ptr.dtype.element_ty  # the interpreter's tl.dot takes float32
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(dtype)
        # Keys [lo, hi): hi past the tile's last row, lo the first any row's window holds (BLOCK_N-aligned).
        # Keys before `first` are read by no row (their blocks may be released: never loaded).
        hi = pos0 + rows
        first = 0
        lo = 0
        if WINDOW:
            first = tl.maximum(pos0 - window + 1, 0)
            lo = first // BLOCK_N * BLOCK_N
        # Scores of masked keys are a large finite negative, not -inf: a row none of a tile's keys is visible to
        # (a padding row, or a window's edge) then gets finite weights that the next visible key's larger max
        # scales to zero, never exp(-inf - -inf) = NaN.
        m = tl.full([ROWS], -1.0e30, tl.float32)
        denom = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HEAD_PAD], tl.float32)
        head_base = cache_ptr + kv_head * HEAD_DIM + d[None, :]
        table = block_table_ptr + seq * stride_bt
        offs = tl.arange(0, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            kpos = start + offs
            k_ok = (kpos < hi) & (kpos >= first)
            block = tl.load(table + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
            row = (block * block_stride + (kpos % BLOCK_SIZE) * (NUM_KV_HEADS * HEAD_DIM))[:, None]
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(head_base + k_offset + row, mask=kv_mask, other=0.0).to(dtype)  # [BLOCK_N, D]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [M, BLOCK_N]
            visible = k_ok[None, :] & (kpos[None, :] <= qpos[:, None])
            if WINDOW:
                visible = visible & (kpos[None, :] > qpos[:, None] - window)
            s = tl.where(visible, s, -1.0e30)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            v = tl.load(head_base + v_offset + row, mask=kv_mask, other=0.0).to(dtype)  # [BLOCK_N, D]
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=PRECISION)
            m = m_new
        out = acc * v_scale / denom[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    return paged_prefill_kernel


def paged_prefill(q: torch.Tensor, kv_cache: torch.Tensor, layer_in_group: int, tiles: torch.Tensor,
                  block_table: torch.Tensor, window: int | None, scale: float, out: torch.Tensor,
                  kv_scales: tuple[float, float] = (1.0, 1.0), launch: PrefillLaunch | None = None) -> None:
    """Attention of the prompt rows `tiles` names (int32 [n, 4] from `prefill_tiles`, on q's device) over the
    keys the cache holds for their sequences (block_table [S, max_blocks], a tile's sequence index a row of it),
    each row causal to its position: written into out[rows] (q, out [T, Hq, D]). The chunk's own keys and
    values must be in the cache already. kv_scales: (k_scale, v_scale) of an fp8 cache (ignored otherwise)."""
    import triton

    launch = launch or prefill_launch()
    if kv_cache.dtype != torch.float8_e4m3fn:
        kv_scales = (1.0, 1.0)
    num_tiles = tiles.shape[0]
    if num_tiles == 0:
        return
    _, layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    group = q.shape[1] // num_kv_heads
    plane = block_size * num_kv_heads * head_dim  # elements of one (layer, k|v) slice of a block
    interpret = interpret_mode()
    block_table = block_table.contiguous()
    _kernels(interpret)[(num_tiles, num_kv_heads)](
        q, kv_cache, block_table, tiles, out, scale * kv_scales[0], kv_scales[1], window or 0,
        q.stride(0), q.stride(1), block_table.stride(0), out.stride(0), out.stride(1),
        layers * 2 * plane, (2 * layer_in_group) * plane, (2 * layer_in_group + 1) * plane,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=_pow2(group), ROWS=launch.rows(group),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEAD_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=launch.block_n, PRECISION="ieee" if q.dtype == torch.float32 or interpret else "tf32",
        DOT_FP32=interpret, WINDOW=window is not None, num_warps=launch.warps(group), num_stages=launch.num_stages,
    )
