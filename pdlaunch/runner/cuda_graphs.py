"""Decode steps replayed from CUDA graphs, one graph per batch size of a ladder.

A decode step of an 8B model is ~400 kernels that each run for microseconds; launched one by one
from Python the host is the bottleneck (HF `generate`: 55 ms per token on an H100 against a 5.3 ms
memory floor). A captured graph launches them all at once.

A step qualifies when every scheduled sequence has query length 1 (decodes, and 1-token prompts) and there are at
most `max(sizes)` of them. Its N rows are padded to the next ladder size B: the inputs go into static device buffers
(one pinned host buffer, one asynchronous copy and one kernel that fills in the in-flight step's ids:
stage_inputs.py; no host sync before the sampler's), padding rows get slot -1 (their KV is never written) and a
sequence length of 1 (their attention reads one key of block 0 and is discarded), the graph of size B is replayed,
and the first N rows of its logits are returned, with their argmax: the graph ends with it
(`fused_ops.argmax_rows`), so a greedy step launches no sampling kernel of its own.

The graphs read the weights and KV cache at fixed addresses. CuMem sleep/wake keeps them (same
virtual addresses), so graphs stay valid across sleep; their own pool (~100 MiB for an 8B model
at batch 64) stays allocated while asleep: capturing again at every wake-up took 2-4 s on an
H100. If the KV tensors are ever re-created the graphs are captured again before the next replay.

Short prompts run as rows too (`prompt_rows`, which the runner turns on on CUDA): a step whose prompts each bring
at most `PROMPT_ROWS_MAX_QUERY` tokens (a multi-turn chat's new turn over its cached conversation, a chunk's tail,
a short fresh prompt) replays the graph of its token count, one row per token. The row of a prompt's token at position p
reads its sequence's block table with a sequence length of p + 1: that is the token's causal attention, over keys
the step's KV write has just put in the cache (the write precedes the attention in every layer). Otherwise such a
step replays piecewise with eager attention between the pieces (runner/mixed_graphs.py), whose host time (~10 ms a
step on an 8B model, whatever the prompt's length) every running decode and the prompt's first token wait for.
Each prompt row reads its whole context where SDPA reads it once for the prompt, so `PROMPT_ROWS_MAX_KEYS` bounds
the keys the rows read together.

On CPU there is nothing to capture: `run` executes the padded step eagerly on the same buffers,
which is how CPU tests exercise the padding and staging logic (prompt rows only where a test turns them on).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from pdlaunch.memory.platform import cuda_stream
from pdlaunch.model.attention_metadata import AttentionMetadata
from pdlaunch.model.blas import decode_capture_blas
from pdlaunch.model.fused_ops import argmax_rows
from pdlaunch.runner.stage_inputs import StageLayout, scatter
from pdlaunch.runner.step_inputs import StepInputs

log = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 256
WARMUP_RUNS = 2
# Prompt tokens as rows (module docstring): at most this many new tokens per prompt, and at most this many keys
# read by all prompt rows together (sum of their sequence lengths: 8 MiB of an 8B model's KV a row at 2k context).
PROMPT_ROWS_MAX_QUERY = 128
PROMPT_ROWS_MAX_KEYS = 256 * 1024
# Graphs up to this many rows are captured when prompt rows are on, whatever max_num_seqs (64 by default): a turn
# of ~80 new tokens beside 16 running decodes is 96 rows.
PROMPT_ROWS_GRAPH_ROWS = 128

# Rows of the packed 1-D inputs (with the tables: one pinned host buffer, one copy per step).
_IDS, _POS, _SEQ_LENS, _CTX_LENS, _SLOTS = range(5)


def graph_rows(max_num_seqs: int, prompt_rows: bool) -> int:
    """The most rows a decode graph is captured for: max_num_seqs, at least PROMPT_ROWS_GRAPH_ROWS with prompt
    rows."""
    return max(max_num_seqs, PROMPT_ROWS_GRAPH_ROWS) if prompt_rows else max_num_seqs


def ladder(max_num_seqs: int, limit: int = MAX_GRAPH_BATCH) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 up to min(max_num_seqs, limit)."""
    top = max(1, min(max_num_seqs, limit))
    sizes = [s for s in (1, 2, 4, 8) if s < top] + list(range(16, top + 1, 16))
    if not sizes or sizes[-1] != top:
        sizes.append(top)
    return sorted(set(sizes))


class DecodeGraphs:
    """Static buffers and captured graphs of `forward(batch_size) -> logits [B, V]`.

    `forward` is bound to a runner: it runs the model on `attention(B)` and the first B rows of
    `input_ids`/`positions`, and returns float32 logits of every row.
    """

    def __init__(self, sizes: Sequence[int], num_groups: int, block_size: int, max_blocks_per_seq: int,
                 device: torch.device, kv_caches: Callable[[], list[torch.Tensor]],
                 prompt_rows: bool = False, rows_per_program: int = 1) -> None:
        """`prompt_rows`: replay steps with short prompts as one row per token (module docstring; the runner
        decides, ModelRunner's `prompt_rows`). `rows_per_program`: how many of a prompt's rows one paged-decode
        program computes (model/triton_decode.rows_per_program of the model's heads)."""
        self.sizes = sorted(sizes)
        self.prompt_rows = prompt_rows
        self.rows_per_program = rows_per_program
        self.block_size = block_size
        self.max_batch = self.sizes[-1]
        self.max_blocks = max_blocks_per_seq
        self.device = device
        self.num_groups = num_groups
        self._kv_caches = kv_caches
        b = self.max_batch
        pin = device.type == "cuda"
        # [4 + G + 2, B]: ids, positions, seq_lens, context_lens, slots of group 0..G-1, each row's lead row, each
        # row's source in the in-flight step's ids (async scheduling; -1: its id is the host's).
        self._leads = _SLOTS + num_groups
        self._pending = self._leads + 1
        self._rows = self._pending + 1
        self.packed = torch.zeros(self._rows, b, dtype=torch.long, device=device)
        self.tables = [torch.zeros(b, max_blocks_per_seq, dtype=torch.long, device=device)
                       for _ in range(num_groups)]
        # Every input of a step, laid out by StageLayout: one copy from the pinned host buffer (stage_inputs.py).
        stage_size = self._rows * b + num_groups * b * max_blocks_per_seq
        self.stage_host = torch.zeros(stage_size, dtype=torch.long, pin_memory=pin)
        self.stage = torch.zeros(stage_size, dtype=torch.long, device=device) if pin else self.stage_host
        self.query_start_loc = torch.arange(b + 1, dtype=torch.long, device=device)
        # batch size -> (graph, its float32 logits [B, V], their argmax [B] long, computed inside the graph)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        # ... and, with prompt rows and several rows a program, one per size from 2 rows for the steps with prompt
        # rows: their paged decode groups a prompt's rows (row_leads); a decode step keeps the plain kernel, which
        # that grouping slows (H100, 8B, 16 decodes: 7.1 -> 7.5 ms a step).
        self.row_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._rows_mode = False  # what attention() gives the forward being captured
        self._captured_for: list[int] = []
        self._pool: object | None = None
        # Recorded after each load's copies out of the pinned host buffers: with async scheduling the next
        # load may start before the device ran them, and must not overwrite what they still read.
        self._loaded: torch.cuda.Event | None = None

    # -- inputs ----------------------------------------------------------------------------------
    def attention(self, batch: int) -> AttentionMetadata:
        """Metadata over the first `batch` rows of the static buffers (valid for every replay)."""
        on_cuda = self.device.type == "cuda"
        if on_cuda:  # graphs: only an upper bound is known at capture time (the kernels read the tensors)
            seq_lens_cpu = [self.max_blocks * self.block_size] * batch
        else:  # eager on CPU: the torch attention path plans with the real lengths
            seq_lens_cpu = self.packed[_SEQ_LENS, :batch].tolist()
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:batch + 1],
            seq_lens=self.packed[_SEQ_LENS, :batch],
            context_lens=self.packed[_CTX_LENS, :batch],
            slot_mapping=[self.packed[_SLOTS + g, :batch] for g in range(self.num_groups)],
            block_tables=[t[:batch] for t in self.tables],
            max_query_len=1,
            max_seq_len=max(seq_lens_cpu),
            query_lens_cpu=[1] * batch,
            seq_lens_cpu=seq_lens_cpu,
            uniform_decode=on_cuda,
            row_leads=self.packed[self._leads, :batch] if on_cuda and self._rows_mode else None,
        )

    def input_ids(self, batch: int) -> torch.Tensor:
        return self.packed[_IDS, :batch]

    def positions(self, batch: int) -> torch.Tensor:
        return self.packed[_POS, :batch]

    def batch_size_for(self, inputs: StepInputs) -> int | None:
        """The ladder size this step runs at, or None when it must run eagerly (or piecewise)."""
        n = int(inputs.input_ids.shape[0])  # rows: one per token
        if n > self.max_batch or any(t.shape[1] > self.max_blocks for t in inputs.block_tables):
            return None
        if any(q != 1 for q in inputs.query_lens) and not self._prompts_as_rows(inputs):
            return None
        return next(s for s in self.sizes if s >= n)

    def _prompts_as_rows(self, inputs: StepInputs) -> bool:
        """Whether this step's prompts are short enough to run one row per token (module docstring)."""
        if not self.prompt_rows or not 1 <= min(inputs.query_lens) <= max(inputs.query_lens) <= PROMPT_ROWS_MAX_QUERY:
            return False
        keys = sum(q * c + q * (q + 1) // 2 for q, c in zip(inputs.query_lens, inputs.context_lens) if q > 1)
        # Every token must be written before a later row reads it: a slot of -1 (not written) keeps the step off.
        return keys <= PROMPT_ROWS_MAX_KEYS and all(bool((s >= 0).all()) for s in inputs.slot_mapping)

    def load(self, inputs: StepInputs, batch: int) -> None:
        """Copy the step's inputs into the static buffers, one row per token; rows past the step are padding.
        The in-flight step's sampled ids (`inputs.pending_*`) are filled in on the device."""
        n = int(inputs.input_ids.shape[0])
        pad = batch - n
        # Context before each row's token: a decode's context, or a prompt token's position in its sequence.
        ctx = [c + j for q, c in zip(inputs.query_lens, inputs.context_lens) for j in range(q)]
        pending = [-1] * batch
        source = inputs.pending_source if inputs.pending_rows else None
        for row, src in zip(inputs.pending_rows, inputs.pending_src):
            pending[row] = src
        repeats = torch.tensor(inputs.query_lens) if any(q != 1 for q in inputs.query_lens) else None
        tables = []
        for g in range(self.num_groups):
            table = inputs.block_tables[g]
            if repeats is not None:  # each prompt token's row reads its sequence's blocks
                table = table.repeat_interleave(repeats, dim=0)
            tables.append(table)
        layout = StageLayout.of(self._rows, batch, n, [t.shape[1] for t in tables])
        if self._loaded is not None:
            self._loaded.synchronize()
        # One host buffer of every input, padded (a few large ops beat many small ones: the GPU waits for this).
        rows = [inputs.input_ids.tolist() + [0] * pad, inputs.positions.tolist() + [0] * pad,
                [c + 1 for c in ctx] + [1] * pad, ctx + [0] * pad,
                *(inputs.slot_mapping[g].tolist() + [-1] * pad for g in range(self.num_groups)),
                self._row_leads(inputs.query_lens, batch), pending]
        host = self.stage_host
        host[:self._rows * batch] = torch.tensor(rows, dtype=torch.long).view(-1)
        for table, width, offset in zip(tables, layout.widths, layout.table_offsets):
            # -1 (a block left the sliding window) reads as block 0, masked by the kernel.
            host[offset:offset + n * width].view(n, width).copy_(table.clamp(min=0))
        if self.stage is not host:
            self.stage[:layout.size].copy_(host[:layout.size], non_blocking=True)
        if self.device.type == "cuda":
            self._loaded = self._loaded or torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._loaded.record()
        scatter(self.stage, layout, self.packed, self.tables, _IDS, self._pending, source)

    def _row_leads(self, query_lens: Sequence[int], batch: int) -> list[int]:
        """Each of `batch` rows' lead row: a prompt's rows in runs of rows_per_program, led by the run's first
        (one paged-decode program computes the run, loading each K/V tile once); a decode or padding row
        leads itself."""
        per = self.rows_per_program
        if per == 1 or all(q == 1 for q in query_lens):
            return list(range(batch))
        leads: list[int] = []
        for q in query_lens:
            start = len(leads)
            leads.extend(start + j // per * per for j in range(q))
        return leads + list(range(len(leads), batch))

    def _warm_staging(self) -> None:
        """Compile the staging kernel's two variants (with and without in-flight ids) now, not at the first steps
        that need them: they rewrite the packed rows with their own values (every pending source -1)."""
        rows, batch = self._rows, self.max_batch
        self.stage[:rows * batch].copy_(self.packed.view(-1))
        layout = StageLayout.of(rows, batch, 0, [0] * self.num_groups)
        for source in (None, self.packed[_IDS, :1]):
            scatter(self.stage, layout, self.packed, self.tables, _IDS, self._pending, source)

    # -- capture and replay ----------------------------------------------------------------------
    def _kv_pointers(self) -> list[int]:
        return [t.data_ptr() for t in self._kv_caches()]

    def capture(self, forward: Callable[[int], torch.Tensor]) -> None:
        """Capture one graph per ladder size, largest first, sharing one memory pool."""
        if self.device.type != "cuda":
            return
        start = time.perf_counter()
        self.graphs.clear()
        self.row_graphs.clear()
        self.packed[_SLOTS:] = -1  # warm-up and capture runs write no KV
        self.packed[self._leads] = torch.arange(self.max_batch, device=self.device)  # and every row leads itself
        self.packed[_SEQ_LENS] = 1
        self.packed[_IDS:_SEQ_LENS] = 0
        self.packed[_CTX_LENS] = 0
        self._warm_staging()
        for t in self.tables:
            t.zero_()
        pool = torch.cuda.graph_pool_handle()
        side = cuda_stream(self.device)
        grouped = self.prompt_rows and self.rows_per_program > 1
        # PDLAUNCH_BLAS=cublaslt-decode: the products captured here go through cuBLASLt (model/blas.py)
        with decode_capture_blas(self.device):
            for batch in sorted(self.sizes, reverse=True):
                for rows_mode in (False, True) if grouped and batch > 1 else (False,):
                    self._rows_mode = rows_mode
                    side.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(side):
                        for _ in range(WARMUP_RUNS):  # compiles Triton kernels, sizes cuBLAS workspaces
                            argmax_rows(forward(batch))
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    # thread_local: NIXL/UCX threads may make CUDA calls of their own during a capture (one
                    # run() starts after the KV moved); they touch none of the captured stream's work.
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        out = forward(batch)
                        ids = argmax_rows(out)
                    (self.row_graphs if rows_mode else self.graphs)[batch] = (graph, out, ids)
        self._rows_mode = False
        torch.cuda.synchronize(self.device)
        self._pool = pool
        self._captured_for = self._kv_pointers()
        log.info("captured CUDA graphs for decode batch sizes %s in %.1f s", self.sizes, time.perf_counter() - start)

    def run(self, inputs: StepInputs, batch: int, forward: Callable[[int], torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 logits [N, V] of the step's N token rows and, from a replayed graph, their argmax [N] (the greedy
        ids, computed inside the graph; None on CPU). On CUDA both are views of the graph's output buffers: consume
        them before the next step (work queued on the stream before the next replay does)."""
        n = int(inputs.input_ids.shape[0])
        if self.device.type == "cuda" and self._captured_for != self._kv_pointers():
            log.warning("KV cache tensors moved since the CUDA graphs were captured: capturing again")
            self.capture(forward)
        self.load(inputs, batch)
        if self.device.type != "cuda":
            return forward(batch)[:n], None
        rows = batch in self.row_graphs and any(q != 1 for q in inputs.query_lens)
        graph, out, ids = (self.row_graphs if rows else self.graphs)[batch]
        graph.replay()
        return out[:n], ids[:n]
