"""Runs the model for one step's batch: owns the weights and the KV cache tensors.

The step's inputs (runner/step_inputs.py) are built above, by the engine (engine/step_builder.py),
from its schedule and block tables; every TP rank runs the same inputs.

`ModelRunner` is this module (start-up and `run`) with its parts: the KV cache tensors and the memory profile
that sizes them (kv_cache_tensors.py), the steps that write nothing (dry_steps.py: the profile's step and the
warm-up) and the CUDA graphs' setup (graph_setup.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pdlaunch.config.engine_config import CacheConfig, SchedulerConfig
from pdlaunch.config.strict_model import Role
from pdlaunch.errors import EngineError
from pdlaunch.memory.cumem import memory_pool_context
from pdlaunch.memory.platform import device_memory_bytes, to_device_async
from pdlaunch.metrics.engine_steps import count_step_path
from pdlaunch.model.blas import select_blas_library
from pdlaunch.model.checkpoint import Checkpoint
from pdlaunch.model.loader import load_model
from pdlaunch.model.quant.fp8 import FP8_DTYPE
from pdlaunch.model.quant.kv_cache import resolve_kv_cache_dtype, warn_unscaled
from pdlaunch.runner.cuda_graphs import DecodeGraphs
from pdlaunch.runner.graph_setup import GraphSetup, prompt_rows_setting
from pdlaunch.runner.host_threads import settle_host_threads
from pdlaunch.runner.kv_cache_tensors import KVCacheTensors
from pdlaunch.runner.mixed_graphs import MixedGraphs
from pdlaunch.runner.out_of_memory import first_line, free_text, out_of_memory
from pdlaunch.runner.prompt_logprobs import PromptLogprobsOut, PromptRows
from pdlaunch.runner.prompt_logprobs import compute as compute_prompt_logprobs
from pdlaunch.runner.step_inputs import StepInputs
from pdlaunch.runner.step_metadata import step_metadata

log = logging.getLogger(__name__)


class ModelRunner(KVCacheTensors, GraphSetup):
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
        sleep_mode: bool = False,
        agree_num_blocks: Callable[[int], int] | None = None,
        after_load: Callable[[], None] | None = None,
        decode_graphs: bool = False,
        expert_parallel: bool = False,
        role: Role = "colocated",
        mixed_graphs: bool = False,
        prompt_rows: bool | None = None,
    ) -> None:
        """`agree_num_blocks` turns this rank's block count into the one every TP rank uses
        (the minimum over ranks), so block ids mean the same slots on every rank. `after_load` runs once the
        weights are loaded, before anything that waits on the other TP ranks (TPGroup.loaded).

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
        self.sleep_mode = sleep_mode  # a CPU KV cache then stays resizable (kv_cache_tensors.zeros)
        arch = checkpoint.arch
        self.groups = arch.kv_cache_groups()
        self.tp_rank, self.tp_size, self.expert_parallel = tp_rank, tp_size, expert_parallel
        self.num_kv_heads = max(1, arch.num_kv_heads // tp_size)  # per TP rank (replicated when tp > kv heads)
        self.head_dim = arch.head_dim
        free_at_start = device_memory_bytes(device.index or 0)[0] if device.type == "cuda" else 0
        select_blas_library(device)  # PDLAUNCH_BLAS, before any product (and before graphs are captured)
        try:
            with memory_pool_context(use_cumem, "weights"):
                self.model = load_model(checkpoint, device, dtype, tp_rank, tp_size, expert_parallel,
                                        fp8_kv_cache=self.kv_dtype == FP8_DTYPE)
        except RuntimeError as exc:
            if not out_of_memory(exc):
                raise
            raise EngineError(
                f"the model's weights did not fit in GPU memory{free_text(device)}: {first_line(exc)}",
                field="model.path",
                hint="another process may hold the memory (nvidia-smi lists them); otherwise the model needs more "
                     "than this GPU: split it over more GPUs (--tp), quantize it (--quantization fp8), or give it a "
                     "GPU of its own",
            ) from None
        self.weights_version = 0  # a level-2 wake-up reloads the weights from the checkpoint: +1 (engine/sleep_mode.py)
        if after_load is not None:
            after_load()
        if self.kv_dtype == FP8_DTYPE and tp_rank == 0:
            warn_unscaled(self.model.unscaled_kv_layers, arch.num_layers)
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
        settle_host_threads(device)  # loaded, warmed and captured: from here on the host ops are small

    # -- one step --------------------------------------------------------------------------------
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
            count_step_path("rows" if any(q != 1 for q in inputs.query_lens) else "decode")
            logits, argmax = self.graphs.run(inputs, batch, self._graph_forward)
            if inputs.sample_rows == list(range(logits.shape[0])):
                self.argmax = argmax
                return logits
            # A prompt's rows sample only its last token (none for a chunk that does not end the prompt).
            keep = to_device_async(torch.tensor(inputs.sample_rows, dtype=torch.long), self.device)
            self.argmax = None if argmax is None else argmax[keep]
            return logits[keep]
        attn = step_metadata(inputs.query_lens, inputs.context_lens, inputs.slot_mapping, inputs.block_tables,
                             self.device)
        size = self.mixed.size_for(inputs) if self.mixed is not None and self.kv_caches else None
        if self.mixed is not None and size is not None:
            count_step_path("piecewise")
            hidden = self.mixed.run(inputs, size, attn)
        else:
            count_step_path("eager")
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

