"""Runs the model for one step's batch: owns the weights and the KV cache tensors.

The step's inputs (runner/step_inputs.py) are built above, by the engine (engine/step_builder.py),
from its schedule and block tables; every TP rank runs the same inputs.

KV cache: one tensor per KV-cache group in the block-major layout of
model/attention_metadata.py, [num_blocks, layers_in_group, 2, block_size, kv_heads, head_dim], so
one block of every layer of a group is one contiguous byte range and runs of blocks coalesce into
MiB-sized transfer descriptors. Block count: `cache.num_gpu_blocks` if set; on CUDA what is left of
`gpu_memory_utilization * total` after the weights and the activations of a profiled
`max_num_batched_tokens` step (`SchedulerConfig.token_budget`); on CPU `cache.cpu_kv_cache_gb`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from pdlaunch import metrics
from pdlaunch.config.models import CacheConfig, Role, SchedulerConfig
from pdlaunch.errors import EngineError
from pdlaunch.memory.cumem import memory_pool_context
from pdlaunch.memory.platform import device_memory_bytes, to_device_async
from pdlaunch.model.attention import graph_safe
from pdlaunch.model.attention_metadata import AttentionMetadata
from pdlaunch.model.blas import select_blas_library
from pdlaunch.model.decode_launch import launch_batch_sizes, rows_per_program
from pdlaunch.model.loader import Checkpoint, load_model
from pdlaunch.model.overrides import env_choice
from pdlaunch.model.quant.kv_cache import resolve_kv_cache_dtype, scales_digest
from pdlaunch.runner.cuda_graphs import DecodeGraphs, graph_rows, ladder
from pdlaunch.runner.mixed_graphs import MAX_MIXED_TOKENS, MixedGraphs, max_mixed_tokens, mixed_ladder
from pdlaunch.runner.prompt_logprobs import PromptLogprobsOut, PromptRows
from pdlaunch.runner.prompt_logprobs import compute as compute_prompt_logprobs
from pdlaunch.runner.step_inputs import StepInputs

log = logging.getLogger(__name__)


NON_TORCH_CAP_BYTES = 2 * 2**30


class ModelRunner:
    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        dtype: torch.dtype,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        max_model_len: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        use_cumem: bool = False,
        agree_num_blocks: Callable[[int], int] | None = None,
        decode_graphs: bool = False,
        expert_parallel: bool = False,
        role: Role = "colocated",
        mixed_graphs: bool = False,
        prompt_rows: bool | None = None,
    ) -> None:
        """`agree_num_blocks` turns this rank's block count into the one every TP rank uses
        (the minimum over ranks), so block ids mean the same slots on every rank.

        `decode_graphs`: replay decode steps from CUDA graphs (runner/cuda_graphs.py; TP 1 and a
        cache the Triton kernels serve, else eager). On CPU the same padded path runs eagerly.
        `mixed_graphs`: replay the other steps of up to 2048 tokens (MoE models: 8192) piecewise
        (runner/mixed_graphs.py; the same conditions).
        `prompt_rows`: the decode graphs take steps with short prompts too, a row per token (cuda_graphs.py);
        None: on CUDA with a cache of the model's dtype, unless PDLAUNCH_PROMPT_ROWS=off.
        `expert_parallel`: MoE experts whole per TP rank (model/moe/experts.py)."""
        self.checkpoint = checkpoint
        self.device = device
        self.dtype = dtype
        self.kv_dtype = resolve_kv_cache_dtype(cache.kv_cache_dtype, dtype)  # fp8: model/quant/kv_cache.py
        self.cache_config = cache
        self.scheduler_config = scheduler
        self.role = role  # the step token budget depends on it (SchedulerConfig.token_budget)
        self.max_model_len = max_model_len
        self.block_size = cache.block_size
        self.use_cumem = use_cumem
        arch = checkpoint.arch
        self.groups = arch.kv_cache_groups()
        self.tp_rank, self.tp_size, self.expert_parallel = tp_rank, tp_size, expert_parallel
        self.num_kv_heads = max(1, arch.num_kv_heads // tp_size)  # per TP rank (replicated when tp > kv heads)
        self.head_dim = arch.head_dim
        free_at_start = device_memory_bytes(device.index or 0)[0] if device.type == "cuda" else 0
        select_blas_library(device)  # PDLAUNCH_BLAS, before any product (and before graphs are captured)
        try:
            with memory_pool_context(use_cumem, "weights"):
                self.model = load_model(checkpoint, device, dtype, tp_rank, tp_size, expert_parallel)
        except RuntimeError as exc:
            if not out_of_memory(exc):
                raise
            raise EngineError(
                f"the model's weights did not fit in GPU memory{_free_text(device)}: {_first_line(exc)}",
                field="model.path",
                hint="another process may hold the memory (nvidia-smi lists them); otherwise the model needs more "
                     "than this GPU: split it over more GPUs (--tp), quantize it (--quantization fp8), or give it a "
                     "GPU of its own",
            ) from None
        if arch.moe is not None and tp_rank == 0:
            log.info("MoE: %s over TP %d", "whole experts per rank (expert parallel)" if expert_parallel
                     else "every expert's width split", tp_size)
        self.num_blocks = self._determine_num_blocks(free_at_start)
        if agree_num_blocks is not None:
            self.num_blocks = agree_num_blocks(self.num_blocks)
        self.kv_caches: list[torch.Tensor] = []
        self.allocate_kv_caches()
        if device.type == "cuda":
            self._warm_up()
        if prompt_rows is None:  # PDLAUNCH_PROMPT_ROWS=off: such steps replay piecewise (debugging, benchmarks)
            # Not over an fp8 cache: there the paged kernel's fp8 dot products differ from the prompt path's
            # (SDPA over the cache's values), and the tokens of a float32 engine with and without graphs would too.
            prompt_rows = (device.type == "cuda" and prompt_rows_setting() != "off"
                           and self.kv_dtype == dtype)
        self._prompt_rows = prompt_rows
        self.graphs: DecodeGraphs | None = self._init_graphs() if decode_graphs else None
        self.mixed: MixedGraphs | None = self._init_mixed_graphs() if mixed_graphs else None
        self.prompt_logprobs: PromptLogprobsOut | None = None  # of the last step run
        # The argmax of the last step's logits rows when a decode graph computed it (None otherwise): the sampler's
        # greedy ids when no processor or grammar changes the logits.
        self.argmax: torch.Tensor | None = None

    # -- KV cache --------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        """Bytes of one block id across every group (each group has its own tensor)."""
        elem = torch.tensor([], dtype=self.kv_dtype).element_size()
        per_layer = 2 * self.block_size * self.num_kv_heads * self.head_dim * elem
        return per_layer * sum(len(g.layers) for g in self.groups)

    def allocate_kv_caches(self) -> None:
        """(Re)create the zeroed cache tensors, e.g. after a sleep discarded them."""
        try:
            with memory_pool_context(self.use_cumem, "kv_cache"):
                self.kv_caches = [
                    torch.zeros(self.num_blocks, len(g.layers), 2, self.block_size, self.num_kv_heads,
                                self.head_dim, dtype=self.kv_dtype, device=self.device)
                    for g in self.groups
                ]
        except RuntimeError as exc:
            if not out_of_memory(exc):
                raise
            self.kv_caches = []
            raise self._kv_cache_oom(exc) from None

    def _kv_cache_oom(self, exc: RuntimeError) -> EngineError:
        """The error for a KV cache that did not fit: usually other processes (another instance's KV cache
        allocated after this one's profile, or anything else on the GPU) hold memory the budget counted on."""
        needed = self.num_blocks * self.block_bytes
        field = ("cache.num_gpu_blocks" if self.cache_config.num_gpu_blocks is not None
                 else "cache.gpu_memory_utilization")
        return EngineError(
            f"the KV cache ({self.num_blocks} blocks, {needed / 2**30:.2f} GiB) did not fit in GPU memory"
            f"{_free_text(self.device)}: {_first_line(exc)}",
            field=field,
            hint="lower it; instances sharing a GPU each take their fraction of the whole GPU, so theirs must add "
                 "up to less than 1 with room for what other processes hold (nvidia-smi lists them)",
        )

    def kv_scales_digest(self) -> str:
        """Digest of the per-layer FP8 KV scales ("" when the cache is not fp8): P and D must agree."""
        return scales_digest(self.model.kv_scales()) if self.kv_dtype != self.dtype else ""

    def _determine_num_blocks(self, free_at_start: int) -> int:
        if self.cache_config.num_gpu_blocks is not None:
            return self.cache_config.num_gpu_blocks
        if self.device.type == "cuda":
            kv_bytes = self._profile_cuda_kv_bytes(free_at_start)
            field = "cache.gpu_memory_utilization"
        else:
            kv_bytes = int(self.cache_config.cpu_kv_cache_gb * 2**30)
            field = "cache.cpu_kv_cache_gb"
        num_blocks = kv_bytes // self.block_bytes
        if num_blocks <= 0:
            raise EngineError(
                f"no memory is left for the KV cache ({kv_bytes / 2**20:.0f} MiB budget, "
                f"{self.block_bytes / 2**20:.2f} MiB per block)",
                field=field,
                hint="raise it, lower scheduler.max_num_batched_tokens, or set cache.num_gpu_blocks",
            )
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.block_size,
                 num_blocks * self.block_bytes / 2**30)
        return num_blocks

    @torch.inference_mode()
    def _profile_cuda_kv_bytes(self, free_at_start: int) -> int:
        """Run the largest step once without a cache and measure what it needs."""
        index = self.device.index or 0
        _, total = device_memory_bytes(index)
        requested = int(self.cache_config.gpu_memory_utilization * total)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = self.scheduler_config.token_budget(self.role)
        lens = self._prompt_lens(num_tokens)
        self._dry_step(lens, [0] * len(lens), [], logit_rows=min(self.scheduler_config.max_num_seqs, num_tokens))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free_now, _ = device_memory_bytes(index)
        # Memory this process took outside torch's allocator (CUDA context, cuBLAS workspaces). When
        # instances share a GPU, the free-memory delta also holds what the others allocated in the
        # meantime (an 8B instance loads 16 GiB), so cap it at what one process's context can take.
        measured = max(0, (free_at_start - free_now) - torch.cuda.memory_reserved(self.device))
        non_torch = min(measured, NON_TORCH_CAP_BYTES)
        torch.cuda.empty_cache()
        kv_bytes = requested - peak - non_torch
        log.info("memory profile: %.2f GiB requested, %.2f GiB peak torch, %.2f GiB other -> %.2f GiB KV",
                 requested / 2**30, peak / 2**30, non_torch / 2**30, kv_bytes / 2**30)
        return kv_bytes

    # -- steps that write nothing: the memory profile and the warm-up ------------------------------
    def _prompt_lens(self, tokens: int) -> list[int]:
        """`tokens` prompt tokens as prompts of at most max_model_len each."""
        return [min(self.max_model_len, tokens - k) for k in range(0, tokens, self.max_model_len)]

    def _dry_step(self, query_lens: list[int], context_lens: list[int], kv_caches: list[torch.Tensor],
                  logit_rows: int) -> None:
        """One forward of these sequences and the logits of `logit_rows` rows: token ids 0, every slot -1
        (nothing is written), context read from block 0 of `kv_caches` (none: fresh prompts only)."""
        tokens = sum(query_lens)
        seq_lens = [q + c for q, c in zip(query_lens, context_lens)]
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(c, n, device=self.device) for c, n in zip(context_lens, seq_lens)])
        no_slots = [torch.full((tokens,), -1, dtype=torch.long)] * len(self.groups)
        width = -(-max(seq_lens) // self.block_size)
        tables = [torch.zeros(len(query_lens), width, dtype=torch.long)] * len(self.groups)
        hidden = self.model(ids, positions, self._metadata(query_lens, context_lens, no_slots, tables), kv_caches)
        self.model.compute_logits(hidden[:logit_rows])

    def warm_up_shapes(self) -> list[tuple[list[int], list[int]]]:
        """(query lengths, context lengths) of the steps `_warm_up` runs: prompts of 1, 2, 4, ... tokens up
        to the step budget (every MoE tile and FP8 GEMM size class), a 16-token chunk over 16 cached tokens
        (a chunked prompt's later steps; fewer under a max_model_len of 32), then, unless this is a prefill
        instance, decode batches of one size per paged-decode launch, alone and beside that chunk (a mixed
        step), each decode with one token of context."""
        budget = self.scheduler_config.token_budget(self.role)
        shapes: list[tuple[list[int], list[int]]] = []
        for tokens in sorted({min(1 << i, budget) for i in range(budget.bit_length() + 1)}):
            lens = self._prompt_lens(tokens)
            shapes.append((lens, [0] * len(lens)))
        chunk = max(1, min(16, self.max_model_len // 2))  # a chunk over as many cached tokens
        shapes.append(([chunk], [chunk]))
        if self.role == "prefill":
            return shapes
        max_seqs = min(self.scheduler_config.max_num_seqs, max(1, budget - 16))
        for n in launch_batch_sizes(max_seqs, self.num_kv_heads, self.head_dim, self.device, self.kv_dtype.itemsize):
            shapes.append(([1] * n, [1] * n))
            shapes.append(([chunk, *[1] * n], [chunk, *[1] * n]))
        return shapes

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Run each step shape of `warm_up_shapes` once before the first request. Triton compiles a kernel
        variant the first time a launch needs it (about a second each on a server's CPU), and a step that
        meets one while serving holds every stream in it that long: measured on an H200, the first ten
        requests of a Qwen3-30B-A3B shape waited 1.7-2.7 s for their first token, later ones 0.4 s.
        The first chunked prompts paid the same in cuDNN/flash kernels loaded on first use: 87 and 105 ms
        for 1008-token chunk steps that take 35-40 ms later. Nothing is written: every slot is -1, and
        context reads block 0 of the (zeroed) cache."""
        started = time.monotonic()
        shapes = self.warm_up_shapes()
        for query_lens, context_lens in shapes:
            try:
                self._dry_step(query_lens, context_lens, self.kv_caches,
                               logit_rows=min(len(query_lens), self.scheduler_config.max_num_seqs))
            except RuntimeError as exc:
                if not out_of_memory(exc):
                    raise
                raise EngineError(
                    f"a step of {sum(query_lens)} tokens ({len(query_lens)} sequences) ran out of GPU memory in the "
                    f"start-up warm-up: {_first_line(exc)}",
                    field="scheduler.max_num_batched_tokens",
                    hint="lower it, or leave more memory to activations: a lower cache.gpu_memory_utilization or "
                         "a smaller cache.num_gpu_blocks",
                ) from None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("warm-up: %d step shapes (prompts up to %d tokens, decode batches up to %d) in %.1f s",
                 len(shapes), max(sum(q) for q, _ in shapes),
                 max((len(q) for q, c in shapes if set(q) == {1} and c[0] > 0), default=0), time.monotonic() - started)

    # -- CUDA graphs ------------------------------------------------------------------------------
    def _graphs_possible(self, what: str) -> bool:
        if self.device.type == "cuda" and (self.tp_size > 1 or not all(graph_safe(c) for c in self.kv_caches)):
            log.info("%s run eagerly: CUDA graphs need TP 1 and the Triton decode kernels", what)
            return False
        return True

    def _init_mixed_graphs(self) -> MixedGraphs | None:
        if not self._graphs_possible("steps with prompt tokens"):
            return None
        budget = self.scheduler_config.token_budget(self.role)
        top = min(budget, max_mixed_tokens(self.checkpoint.arch.moe is not None))
        # A capped prompt chunk shares its step with up to max_num_seqs decodes; a prefill instance runs none.
        chunk = self.scheduler_config.prompt_tokens_while_decoding
        decodes = 0 if self.role == "prefill" else self.scheduler_config.max_num_seqs
        mixed = self._capture_mixed(mixed_ladder(budget, top, chunk, decodes))
        if isinstance(mixed, str) and top > MAX_MIXED_TOKENS:
            # An MoE model's larger pieces hold more activation memory: the dense model's ladder may still fit.
            log.warning("capturing piecewise CUDA graphs of steps up to %d tokens failed (%s); trying up to %d, "
                        "larger steps run eagerly", top, mixed, MAX_MIXED_TOKENS)
            mixed = self._capture_mixed(mixed_ladder(budget, MAX_MIXED_TOKENS, chunk, decodes))
        if isinstance(mixed, str):
            # Serving still works without them: every such step runs eagerly, as with --enforce-eager.
            log.warning("steps with prompt tokens run eagerly: capturing their piecewise CUDA graphs failed (%s). "
                        "Out of memory: lower cache.gpu_memory_utilization; otherwise please report it with this "
                        "log. --enforce-eager turns all CUDA graphs off.", mixed)
            return None
        return mixed

    def _capture_mixed(self, sizes: list[int]) -> MixedGraphs | str:
        """Piecewise graphs of `sizes`, or why capturing them failed (the error's first line)."""
        mixed = MixedGraphs(sizes, self.model, self.device, lambda: self.kv_caches)
        try:
            with torch.inference_mode():
                mixed.capture()
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            del mixed
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
            return _first_line(exc)
        return mixed

    def _init_graphs(self) -> DecodeGraphs | None:
        if not self._graphs_possible("decode steps"):
            return None
        max_blocks = -(-self.max_model_len // self.block_size)
        rows = graph_rows(self.scheduler_config.max_num_seqs, self._prompt_rows)
        arch = self.checkpoint.arch
        # PDLAUNCH_PROMPT_ROWS=ungrouped: each prompt row in a program of its own (benchmarks, debugging)
        grouped = prompt_rows_setting() != "ungrouped"
        per_program = rows_per_program(arch.num_heads // self.tp_size, self.num_kv_heads) if grouped else 1
        graphs = DecodeGraphs(ladder(rows), len(self.groups), self.block_size, max_blocks, self.device,
                              lambda: self.kv_caches, prompt_rows=self._prompt_rows, rows_per_program=per_program)
        self.graphs = graphs
        graphs.capture(self._graph_forward)
        return graphs

    @torch.inference_mode()
    def _graph_forward(self, batch: int) -> torch.Tensor:
        """The captured computation: float32 logits [batch, V] of the static decode buffers."""
        graphs = self.graphs
        assert graphs is not None
        hidden = self.model(graphs.input_ids(batch), graphs.positions(batch), graphs.attention(batch), self.kv_caches)
        return self.model.compute_logits(hidden)

    # -- one step --------------------------------------------------------------------------------
    def _metadata(self, query_lens: Sequence[int], context_lens: Sequence[int], slot_mapping: list[torch.Tensor],
                  block_tables: list[torch.Tensor]) -> AttentionMetadata:
        dev = self.device
        q = torch.tensor(query_lens, dtype=torch.long)
        ctx = torch.tensor(context_lens, dtype=torch.long)
        seq_lens = q + ctx
        qsl = torch.zeros(len(query_lens) + 1, dtype=torch.long)
        torch.cumsum(q, 0, out=qsl[1:])
        return AttentionMetadata(
            query_start_loc=to_device_async(qsl, dev),
            seq_lens=to_device_async(seq_lens, dev),
            context_lens=to_device_async(ctx, dev),
            slot_mapping=[to_device_async(s, dev) for s in slot_mapping],
            block_tables=[to_device_async(t.clamp(min=0), dev) for t in block_tables],
            max_query_len=max(query_lens),
            max_seq_len=int(seq_lens.max()),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=seq_lens.tolist(),
        )

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Forward one step on this rank's shard; float32 logits [len(sample_rows), V].

        Under TP every rank calls this with the same inputs (the forward's collectives pair up);
        only rank 0's logits are sampled. The step's prompt logprobs (runner/prompt_logprobs.py) are left
        in `self.prompt_logprobs` (None when no request asked), the logits' argmax in `self.argmax` when a decode
        graph computed it.
        """
        self.prompt_logprobs = None
        self.argmax = None
        batch = self.graphs.batch_size_for(inputs) if self.graphs is not None and not inputs.prompt_rows else None
        if self.graphs is not None and batch is not None:
            metrics.count_step_path("rows" if any(q != 1 for q in inputs.query_lens) else "decode")
            logits, argmax = self.graphs.run(inputs, batch, self._graph_forward)
            if inputs.sample_rows == list(range(logits.shape[0])):
                self.argmax = argmax
                return logits
            # A prompt's rows sample only its last token (none for a chunk that does not end the prompt).
            keep = to_device_async(torch.tensor(inputs.sample_rows, dtype=torch.long), self.device)
            self.argmax = None if argmax is None else argmax[keep]
            return logits[keep]
        attn = self._metadata(inputs.query_lens, inputs.context_lens, inputs.slot_mapping, inputs.block_tables)
        size = self.mixed.size_for(inputs) if self.mixed is not None and self.kv_caches else None
        if self.mixed is not None and size is not None:
            metrics.count_step_path("piecewise")
            hidden = self.mixed.run(inputs, size, attn)
        else:
            metrics.count_step_path("eager")
            ids = to_device_async(inputs.input_ids, self.device)
            positions = to_device_async(inputs.positions, self.device)
            inputs.fill_pending(ids)
            hidden = self.model(ids, positions, attn, self.kv_caches)
        if inputs.prompt_rows:
            rows = PromptRows(inputs.prompt_rows, inputs.prompt_targets, inputs.prompt_top_k)
            self.prompt_logprobs = compute_prompt_logprobs(self.model.compute_logits, hidden, rows)
        if not inputs.sample_rows:
            return torch.empty(0, self.checkpoint.arch.vocab_size, dtype=torch.float32, device=self.device)
        return self.model.compute_logits(hidden[to_device_async(torch.tensor(inputs.sample_rows), self.device)])

    def release(self) -> None:
        """Drop the cache tensors and the weights (shutdown)."""
        self.kv_caches = []
        self.graphs = None
        self.mixed = None
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def prompt_rows_setting() -> str:
    """PDLAUNCH_PROMPT_ROWS (CUDA instances): `auto` (unset or empty), `off` (steps with prompts replay piecewise) or
    `ungrouped` (a program a prompt row); any other value is refused naming the variable."""
    return env_choice("PDLAUNCH_PROMPT_ROWS", ("auto", "off", "ungrouped"))


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is the GPU running out of memory: torch's allocator (OutOfMemoryError) or the CUDA runtime
    itself (`CUDA error: out of memory`, cudaErrorMemoryAllocation: measured on an H100 with 1.5 GiB left, the
    first launch of a kernel whose module CUDA loads lazily failed so after its tensor had been allocated)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "CUDA error: out of memory" in str(exc))


def _free_text(device: torch.device) -> str:
    """"; F of T GiB are free on cuda:K" after an allocation failed there (torch's cache emptied first); "" on CPU."""
    if device.type != "cuda":
        return ""
    torch.cuda.empty_cache()
    free, total = device_memory_bytes(device.index or 0)
    return f"; {free / 2**30:.2f} of {total / 2**30:.2f} GiB are free on {device}"


def _first_line(exc: BaseException) -> str:
    """An error's first line (torch's out-of-memory message without its advice paragraph); its type if empty."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
