"""Steps with prompt tokens replayed piecewise from CUDA graphs: one graph per piece (model/pieces.py) per
padded token count, attention run eagerly between them.

Why: an eager step that holds a prompt costs the host about as much whatever its size. On an H200 (8B shape,
16 running decodes) a step with a 48-token chunk took ~36 ms of wall time for 6.3 ms of GPU work, and a
1008-token chunk step 31-35 ms: the host launching ~20 kernels a layer one by one from Python. Every decode
running beside a prompt waits that long for its next token (issue 29's colocated ITL p99). Replaying a layer's
work from a graph leaves the host one replay and the attention's few launches per layer.

A step qualifies when it does not qualify for the decode graphs (runner/cuda_graphs.py: those take uniform
decode steps whole) and holds at most `max(sizes)` tokens. Its T tokens are padded to the next ladder size N:
ids, positions and cache slots are copied into the static buffers (padding: token 0, position 0, slot -1), the
N-row graphs of the pieces replay in turn, and between them each layer's attention runs eagerly over the real
T rows with the step's real metadata. The caller computes logits from the first T rows of the final hidden
states. Larger steps run eagerly (`max_mixed_tokens`):
- a dense model's steps above 2048 tokens: their GPU work hides the eager host time (~26 ms for 1k tokens of
  an 8B model). Replayed piecewise, a 4096-token prompt of the 8B shape took 105 ms against 103 ms eagerly on an
  H100;
- an MoE model's steps above 8192 tokens (the default step budget). An MoE layer launches several times the
  kernels of a dense one (routing, sort, padding, two grouped GEMMs, combine): one 3072-token prompt of the
  Qwen3-30B-A3B shape took 73-93 ms eagerly for 58 ms of kernels on an H100, and 63 ms replayed piecewise; at
  8192 tokens, where the GPU work does hide the host, 170-172 ms either way. Capturing its 36 sizes takes
  ~8.5 s against ~2.5 s for 12 (benchmarks/RESULTS.md, thirty-third session).

The graphs read the weights, the KV cache and the buffers at fixed addresses, like the decode graphs: they stay
valid across CuMem sleep and are captured again if the KV tensors are re-created. On CPU the same padded pieces
run eagerly on the same buffers, which is how CPU tests check the padding and staging.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.memory.platform import cuda_stream
from pdlaunch.model.attention_metadata import AttentionMetadata
from pdlaunch.model.llama import CausalLM
from pdlaunch.runner.step_inputs import StepInputs

log = logging.getLogger(__name__)

# The largest step replayed piecewise, by model family (see the module docstring); larger ones run eagerly.
MAX_MIXED_TOKENS = 2048
MAX_MIXED_TOKENS_MOE = 8192


def max_mixed_tokens(moe: bool) -> int:
    """The largest step with prompt tokens that replays piecewise: PDLAUNCH_MIXED_GRAPH_TOKENS=N (benchmarks'
    A/B runs), else by model family."""
    forced = os.environ.get("PDLAUNCH_MIXED_GRAPH_TOKENS", "")
    if forced:
        try:
            value = int(forced)
        except ValueError:
            value = 0
        if value <= 0:
            raise PdlaunchError(f"PDLAUNCH_MIXED_GRAPH_TOKENS={forced!r} is not a positive token count",
                                field="PDLAUNCH_MIXED_GRAPH_TOKENS", hint="unset it, or give e.g. 2048")
        return value
    return MAX_MIXED_TOKENS_MOE if moe else MAX_MIXED_TOKENS


_SMALL = (16, 32, 64, 128, 256)
_STRIDE = 256
_FINE = 64  # the ladder's step above a capped prompt chunk (mixed_ladder)

# Rows of the packed 1-D inputs (one pinned host buffer, one copy per step).
_IDS, _POS, _SLOTS = range(3)


def mixed_ladder(token_budget: int, limit: int = MAX_MIXED_TOKENS, chunk: int = 0, max_decodes: int = 0) -> list[int]:
    """Token counts to capture: 16, 32, 64, 128, 256, then every 256 up to min(token_budget, limit)
    (padding costs at most a quarter of the work from 1024 tokens on, a tenth from 2560 on). `chunk` and
    `max_decodes`: a step beside decodes holds a prompt chunk of at most `chunk` tokens
    (scheduler.prompt_tokens_while_decoding) and up to `max_decodes` decodes; every 64 tokens above the chunk
    up to their sum is captured too, so such a step (1024 + 40 tokens) pads by at most 63 rows, not 216."""
    top = max(1, min(token_budget, limit))
    sizes = [s for s in _SMALL if s < top] + list(range(2 * _STRIDE, top + 1, _STRIDE))
    if chunk > 0 and max_decodes > 0:
        sizes += [s for s in range(chunk + _FINE, chunk + max_decodes + _FINE, _FINE) if s <= top]
    if not sizes or sizes[-1] != top:
        sizes.append(top)
    return sorted(set(sizes))


class MixedGraphs:
    """Static buffers and, on CUDA, the captured pieces of every ladder size."""

    def __init__(self, sizes: Sequence[int], model: CausalLM, device: torch.device,
                 kv_caches: Callable[[], list[torch.Tensor]]) -> None:
        self.sizes = sorted(sizes)
        self.model = model
        self.device = device
        self._kv_caches = kv_caches
        self.num_groups = len(model.kv_cache_groups)
        top = self.sizes[-1]
        self.host = torch.zeros(_SLOTS + self.num_groups, top, dtype=torch.long, pin_memory=device.type == "cuda")
        self.packed = torch.zeros(_SLOTS + self.num_groups, top, dtype=torch.long, device=device)
        # The pieces' 1-D inputs are rows of `packed`: one copy per step loads them all.
        self.bufs = model.piece_buffers(self.packed)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self._captured_for: list[int] = []
        self._pool: object | None = None
        # Recorded after each load's copy out of the pinned host buffer (async scheduling: the next load must
        # not overwrite what the copy still reads).
        self._loaded: torch.cuda.Event | None = None

    # -- inputs ----------------------------------------------------------------------------------
    def size_for(self, inputs: StepInputs) -> int | None:
        """The ladder size this step runs at, or None when it must run eagerly."""
        tokens = int(inputs.input_ids.shape[0])
        if tokens == 0 or tokens > self.sizes[-1]:
            return None
        return next(s for s in self.sizes if s >= tokens)

    def load(self, inputs: StepInputs, size: int) -> None:
        """Copy the step's ids, positions and slots into the static buffers; rows past the step are padding."""
        tokens = int(inputs.input_ids.shape[0])
        if self._loaded is not None:
            self._loaded.synchronize()
        host = self.host[:, :size]
        host[_IDS, :tokens] = inputs.input_ids
        host[_POS, :tokens] = inputs.positions
        host[_IDS:_SLOTS, tokens:] = 0
        for g in range(self.num_groups):
            host[_SLOTS + g, :tokens] = inputs.slot_mapping[g]
        host[_SLOTS:, tokens:] = -1
        # The whole buffer (192 KiB at 8192 tokens): a contiguous copy from pinned memory never blocks the host.
        self.packed.copy_(self.host, non_blocking=True)
        if self.device.type == "cuda":
            self._loaded = self._loaded or torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._loaded.record()
        inputs.fill_pending(self.bufs.input_ids)

    # -- capture and replay ----------------------------------------------------------------------
    def _kv_pointers(self) -> list[int]:
        return [t.data_ptr() for t in self._kv_caches()]

    def capture(self) -> None:
        """Capture every piece at every ladder size, largest first, into one memory pool. The pieces of one
        step replay in the order they were captured, so a piece may reuse what an earlier one freed."""
        if self.device.type != "cuda":
            return
        start = time.perf_counter()
        self.graphs.clear()
        bufs, caches = self.bufs, self._kv_caches()
        self.packed[_IDS:_SLOTS] = 0
        self.packed[_SLOTS:] = -1  # warm-up and capture runs write no KV
        pool = torch.cuda.graph_pool_handle()
        side = cuda_stream(self.device)
        stream = torch.cuda.current_stream(self.device)
        for size in sorted(self.sizes, reverse=True):
            side.wait_stream(stream)
            with torch.cuda.stream(side):  # sizes cuBLAS workspaces, loads kernels, before the capture
                for index in range(self.model.num_pieces):
                    self.model.forward_piece(index, bufs, size, caches)
            stream.wait_stream(side)
            pieces = []
            for index in range(self.model.num_pieces):
                graph = torch.cuda.CUDAGraph()
                # thread_local: NIXL/UCX threads may make CUDA calls of their own during a capture.
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self.model.forward_piece(index, bufs, size, caches)
                pieces.append(graph)
            self.graphs[size] = pieces
        torch.cuda.synchronize(self.device)
        self._pool = pool
        self._captured_for = self._kv_pointers()
        log.info("captured piecewise CUDA graphs of steps with prompt tokens: %d pieces at %s tokens in %.1f s",
                 self.model.num_pieces, self.sizes, time.perf_counter() - start)

    def run(self, inputs: StepInputs, size: int, attn: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] of the step's tokens (a view of the static buffer: consume it before the
        next step). `attn`: the step's real metadata, which the eager attention between pieces reads."""
        tokens = int(inputs.input_ids.shape[0])
        if self.device.type == "cuda" and self._captured_for != self._kv_pointers():
            log.warning("KV cache tensors moved since the piecewise CUDA graphs were captured: capturing again")
            self.capture()
        caches = self._kv_caches()
        plans = self.model.group_plans(attn, caches)
        self.load(inputs, size)
        pieces = self.graphs.get(size) if self.device.type == "cuda" else None
        last = self.model.num_pieces - 1
        for index in range(last + 1):
            if pieces is not None:
                pieces[index].replay()
            else:
                self.model.forward_piece(index, self.bufs, size, caches)
            if index < last:
                self.model.attend_piece(index, self.bufs, tokens, caches, plans)
        return self.bufs.hidden[:tokens]
