"""A replayed step's inputs: one host-to-device copy, then one kernel that puts them in the graphs' buffers.

A decode graph reads its inputs from static device buffers: the packed 1-D rows (ids, positions, lengths, slots,
row leads) and each KV group's block table. Copied one by one, with the in-flight step's sampled ids filled in
after (async scheduling), a batch-1 step spent ~4 copies and 3 small kernels between two graphs, ~50 us of an
8B step's 4.2 ms on an H200 (most of it the device switching between its copy engines and its SMs: a trace of
the step). Here the host lays every input out in one pinned buffer (`StageLayout`), a single copy moves it, and
`scatter` writes the packed rows, the pending ids (a row's source in the in-flight ids, or -1) and the tables'
used columns in one launch (a Triton kernel on CUDA or under the interpreter; the same writes in torch
elsewhere). Measured with the one-kernel cos/sin (H200, 8B): the 1 x 128 step 10-20 us shorter, 64 x 1024 ~30 us
(benchmarks/RESULTS.md, fifty-fifth session).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

import torch

from pdlaunch.model.fused_ops import fused_ops_setting
from pdlaunch.model.triton_env import interpret_mode, triton_importable

BLOCK = 1024  # elements a program of the kernel writes


@dataclass(frozen=True)
class StageLayout:
    """Where one step's inputs lie in the staging buffer: `rows` packed rows of `batch` values each, then each
    group's table, `n` rows of `widths[g]` columns, at `table_offsets[g]`; `size` values in all."""

    rows: int
    batch: int
    n: int
    widths: tuple[int, ...]
    table_offsets: tuple[int, ...]
    size: int

    @staticmethod
    def of(rows: int, batch: int, n: int, widths: list[int]) -> StageLayout:
        offsets, at = [], rows * batch
        for width in widths:
            offsets.append(at)
            at += n * width
        return StageLayout(rows, batch, n, tuple(widths), tuple(offsets), at)


def _use_kernel(t: torch.Tensor) -> bool:
    """The Triton kernel for CUDA tensors (CPU ones under TRITON_INTERPRET=1), unless PDLAUNCH_FUSED_OPS=torch."""
    if not triton_importable() or not (t.is_cuda or interpret_mode()):
        return False
    return fused_ops_setting() != "torch"


@lru_cache(maxsize=2)
def _kernels(interpret: bool) -> SimpleNamespace:
    """The kernel, decorated in the given interpret mode (Triton reads TRITON_INTERPRET when it decorates)."""
    import triton
    import triton.language as tl

    # Every count and offset follows the step's batch and context: specialized on (1, a multiple of 16), each new
    # class would compile another variant in the middle of serving, where warm-up cannot reach every one.
    @triton.jit(do_not_specialize=["packed_stride", "batch", "packed_count", "ids_row", "pend_row", "table_stride",
                                   "table_offset", "width", "table_count"])
    def stage_kernel(stage_ptr, packed_ptr, packed_stride, batch, packed_count, ids_row, pend_row, source_ptr,
                     table_ptr, table_stride, table_offset, width, table_count,
                     HAS_SOURCE: tl.constexpr, BLOCK: tl.constexpr):
        # Elements [0, packed_count) are the packed rows (row r, column c at stage[r * batch + c]); the ids row
        # takes source[stage[pend_row * batch + c]] where that is >= 0. Elements [packed_count, + table_count)
        # are one table's n x width used columns, row-major from stage[table_offset].
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_packed = e < packed_count
        r = e // batch
        c = e % batch
        v = tl.load(stage_ptr + e, mask=in_packed, other=0)
        if HAS_SOURCE:
            pending = in_packed & (r == ids_row)
            src = tl.load(stage_ptr + pend_row * batch + c, mask=pending, other=-1)
            take = pending & (src >= 0)
            v = tl.where(take, tl.load(source_ptr + src, mask=take, other=0), v)
        tl.store(packed_ptr + r * packed_stride + c, v, mask=in_packed)
        t = e - packed_count
        in_table = (t >= 0) & (t < table_count)
        i = t // width
        j = t % width
        tv = tl.load(stage_ptr + table_offset + t, mask=in_table, other=0)
        tl.store(table_ptr + i * table_stride + j, tv, mask=in_table)

    return SimpleNamespace(stage=stage_kernel, cdiv=triton.cdiv)


def scatter(stage: torch.Tensor, layout: StageLayout, packed: torch.Tensor, tables: list[torch.Tensor],
            ids_row: int, pend_row: int, source: torch.Tensor | None) -> None:
    """Write a staged step (`stage`, on the buffers' device, laid out as `layout`) into `packed` [rows, B] (its
    first `layout.batch` columns) and `tables` (each group's first n rows, first width columns). `source`: the
    in-flight step's sampled ids [M] long on the device; the ids row's column c takes source[s] where the pending
    row holds s >= 0 (None: no pending id). One table at least (a model's attention has a KV group)."""
    rows, batch, n = layout.rows, layout.batch, layout.n
    assert tables and len(tables) == len(layout.widths), "one table per KV group"
    if not _use_kernel(stage):
        packed[:, :batch] = stage[:rows * batch].view(rows, batch)
        if source is not None:
            src = packed[pend_row, :batch]
            packed[ids_row, :batch] = torch.where(src >= 0, source[src.clamp(min=0)], packed[ids_row, :batch])
        for table, width, offset in zip(tables, layout.widths, layout.table_offsets):
            table[:n, :width] = stage[offset:offset + n * width].view(n, width)
        return
    kernels = _kernels(interpret_mode())
    for g, table in enumerate(tables):
        packed_count = rows * batch if g == 0 else 0
        width, table_count = layout.widths[g], n * layout.widths[g]
        total = packed_count + table_count
        if total == 0:
            continue
        has_source = g == 0 and source is not None
        kernels.stage[(kernels.cdiv(total, BLOCK),)](
            stage, packed, packed.stride(0), batch, packed_count, ids_row, pend_row,
            source if has_source else stage, table, table.stride(0), layout.table_offsets[g], max(width, 1),
            table_count, HAS_SOURCE=has_source, BLOCK=BLOCK, num_warps=4)
