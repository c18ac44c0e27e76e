"""Steps that write nothing: the memory profile's largest step (kv_cache_tensors.py) and the start-up warm-up.

A dry step runs the model on token ids 0 with every cache slot -1, so no KV is written, and reads any context
from block 0 of the (zeroed) cache.
"""

from __future__ import annotations

import logging
import time

import torch

from pdlaunch.config.engine_config import SchedulerConfig
from pdlaunch.config.strict_model import Role
from pdlaunch.errors import EngineError
from pdlaunch.model.arch import KVCacheGroup
from pdlaunch.model.decode_launch import launch_batch_sizes
from pdlaunch.model.decoder_layer import Attention
from pdlaunch.model.fresh_attention import warm_fresh_attention
from pdlaunch.model.llama import CausalLM
from pdlaunch.model.triton_prefill import PAGED_PREFILL_MAX_TOKENS
from pdlaunch.runner.out_of_memory import first_line, out_of_memory
from pdlaunch.runner.step_metadata import step_metadata

log = logging.getLogger(__name__)


class DrySteps:
    """ModelRunner's dry steps (a part of it: ModelRunner.__init__ sets the attributes below)."""

    model: CausalLM
    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype
    scheduler_config: SchedulerConfig
    role: Role
    max_model_len: int
    block_size: int
    groups: list[KVCacheGroup]
    num_kv_heads: int
    head_dim: int
    kv_caches: list[torch.Tensor]

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
        attn = step_metadata(query_lens, context_lens, no_slots, tables, self.device)
        hidden = self.model(ids, positions, attn, kv_caches)
        self.model.compute_logits(hidden[:logit_rows])

    def warm_up_shapes(self) -> list[tuple[list[int], list[int]]]:
        """(query lengths, context lengths) of the steps `_warm_up` runs: prompts of 1, 2, 4, ... tokens up
        to the step budget (every MoE tile and FP8 GEMM size class), a 16-token chunk over 16 cached tokens
        (a chunked prompt's later steps; fewer under a max_model_len of 32) and, where the budget allows one, a
        chunk over one cached token longer than PAGED_PREFILL_MAX_TOKENS (SDPA over gathered keys with torch's
        causal_lower_right mask, whose first use imports torch._dynamo: measured on an H200, a 2 s stall of the
        first prompt step over a cached prefix longer than that, model/attention.py), then, unless this is a prefill
        instance, decode batches of one size per paged-decode launch, alone and beside that chunk (a mixed
        step), each decode with one token of context."""
        budget = self.scheduler_config.token_budget(self.role)
        shapes: list[tuple[list[int], list[int]]] = []
        for tokens in sorted({min(1 << i, budget) for i in range(budget.bit_length() + 1)}):
            lens = self._prompt_lens(tokens)
            shapes.append((lens, [0] * len(lens)))
        chunk = max(1, min(16, self.max_model_len // 2))  # a chunk over as many cached tokens
        shapes.append(([chunk], [chunk]))
        # A chunk over cached tokens too long for the paged prefill kernel, over one cached token: any context
        # takes that path, and a prefix of one block smaller than `chunk` (block size < 16) leaves room for a
        # chunk that a 16-token context would not (max_model_len 514-528)
        longest = min(budget, self.max_model_len - 1)
        if longest > PAGED_PREFILL_MAX_TOKENS:
            shapes.append(([longest], [1]))
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
                    f"start-up warm-up: {first_line(exc)}",
                    field="scheduler.max_num_batched_tokens",
                    hint="lower it, or leave more memory to activations: a lower cache.gpu_memory_utilization or "
                         "a smaller cache.num_gpu_blocks",
                ) from None
        buckets = self._warm_fresh_attention()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("warm-up: %d step shapes (prompts up to %d tokens, decode batches up to %d) and %d fresh-prompt "
                 "attention lengths in %.1f s", len(shapes), max(sum(q) for q, _ in shapes),
                 max((len(q) for q, c in shapes if set(q) == {1} and c[0] > 0), default=0), buckets,
                 time.monotonic() - started)

    def _warm_fresh_attention(self) -> int:
        """Build the attention plan of every length bucket a fresh prompt of this instance pads to (one step's
        tokens at most; model/fresh_attention.py): the steps above met only the power-of-two ones. Returns how
        many buckets ran (0 off CUDA)."""
        if self.device.type != "cuda":
            return 0
        attn = next((m for m in self.model.modules() if isinstance(m, Attention)), None)
        if attn is None:
            return 0
        longest = min(self.max_model_len, self.scheduler_config.token_budget(self.role))
        return warm_fresh_attention(attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale, self.dtype,
                                    self.device, longest)
