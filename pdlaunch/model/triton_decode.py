"""CUDA paged decode attention (Triton): `paged_decode` launches paged_decode_kernel.py's kernel, programs per
(decode sequence, KV head, context split).

Few sequences give few programs (batch 1 of an 8-KV-head model: 8), so the visible tiles are
split into up to `splits` contiguous ranges, each at least `min_tiles` long (one tile where the
context is at most `short_tiles` tiles; decode_launch.py chooses them); the last range of a
(sequence, KV head) to finish merges the partials. The split count depends only
on the batch and head counts and the ranges on device values, so a CUDA graph replays it for any
context. Also runs under TRITON_INTERPRET=1 on CPU tensors (tests); the engine uses it on CUDA
only (`paged_decode_available`).
"""

from __future__ import annotations

import torch

from pdlaunch.model.decode_launch import DecodeLaunch, choose_launch, rows_per_program, with_override
from pdlaunch.model.overrides import env_choice
from pdlaunch.model.paged_decode_kernel import kernel_for
from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs, pdl_release
from pdlaunch.model.quant.fp8 import FP8_DTYPE, FP8_MAX, INV_FP8_MAX, Fp8Rows
from pdlaunch.model.split_counters import num_sms, split_counters
from pdlaunch.model.triton_env import capability, interpret_mode, triton_importable

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn)
MERGE_ELEMENTS = 8192  # partial values the merging program loads at once (64 float32 registers a thread)


def paged_decode_setting() -> str:
    """PDLAUNCH_PAGED_DECODE: `auto` (unset or empty) or `torch`; any other value is refused naming the variable."""
    return env_choice("PDLAUNCH_PAGED_DECODE", ("auto", "torch"))


def paged_decode_available(kv_cache: torch.Tensor) -> bool:
    """True when the Triton kernel serves this cache: CUDA, Triton installed, not forced off."""
    if not kv_cache.is_cuda or paged_decode_setting() == "torch" or kv_cache.dtype not in _KERNEL_DTYPES:
        return False
    block_size = kv_cache.shape[3]
    return block_size & (block_size - 1) == 0 and triton_importable()


def attention_early() -> bool:
    """A batch-1 paged decode (launched dependent) lets the o projection after it start right after its own wait,
    not after its loop: the projection's programs load their first weight columns while the attention's few
    programs walk their chain of round trips (Qwen3-30B-A3B shape, one H100, batch 1: 3.27 -> 3.23 ms a step;
    benchmarks/RESULTS.md). PDLAUNCH_ATTN_EARLY=off keeps the release after the loop (A/B runs, debugging); values other
    than on and off are refused."""
    return env_choice("PDLAUNCH_ATTN_EARLY", ("on", "off")) == "on"


def _has_fp8_convert(device: torch.device) -> bool:
    """cvt.rn.f16x2.e4m3x2 (PTX 7.8) needs sm_89 or newer."""
    return device.type == "cuda" and capability(device.index or 0) >= (8, 9)


def fp8_qk_f16() -> bool:
    """Over an fp8 cache widened by the hardware (V_F16), the key product runs in float16 too (the e4m3
    widening is one instruction per pair, as for the values): on an H200 the kernel alone went 113.6 -> 100.2 us
    at 48 x 3072 (8 KV heads) and 36.5 -> 32.5 us at 64 x 1024 (4), with the same error against float64
    (RESULTS.md, thirty-fourth session). PDLAUNCH_FP8_QK=bf16 keeps the bf16 product (A/B runs); values other than
    f16 and bf16 are refused."""
    return env_choice("PDLAUNCH_FP8_QK", ("f16", "bf16")) == "f16"


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
    for paged_decode's output (quant/gemm.py `fp8_input_layout` says the scales' layout). `launch` as
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
        sms = num_sms(q.device.index or 0) if q.is_cuda else 16
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
    decode_kernel = kernel_for(interpret)
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
