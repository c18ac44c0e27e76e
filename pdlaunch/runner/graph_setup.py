"""The runner's CUDA graphs set up at start: which ones it can use, their ladders, and their capture.

Decode graphs (cuda_graphs.py) take decode steps, and short prompts as rows; piecewise graphs (mixed_graphs.py)
the other steps with prompt tokens. Both need TP 1 and a cache the Triton decode kernels serve.
"""

from __future__ import annotations

import logging

import torch

from pdlaunch.config.engine_config import SchedulerConfig
from pdlaunch.config.strict_model import Role
from pdlaunch.model.arch import KVCacheGroup
from pdlaunch.model.attention_plan import graph_safe
from pdlaunch.model.checkpoint import Checkpoint
from pdlaunch.model.decode_launch import rows_per_program
from pdlaunch.model.llama import CausalLM
from pdlaunch.model.overrides import env_choice
from pdlaunch.runner.cuda_graphs import DecodeGraphs, graph_rows, ladder
from pdlaunch.runner.mixed_graphs import MAX_MIXED_TOKENS, MixedGraphs, max_mixed_tokens, mixed_ladder
from pdlaunch.runner.out_of_memory import first_line

log = logging.getLogger(__name__)


class GraphSetup:
    """ModelRunner's graph setup (a part of it: ModelRunner.__init__ sets the attributes below)."""

    checkpoint: Checkpoint
    model: CausalLM
    device: torch.device
    scheduler_config: SchedulerConfig
    role: Role
    max_model_len: int
    block_size: int
    groups: list[KVCacheGroup]
    tp_size: int
    num_kv_heads: int
    kv_caches: list[torch.Tensor]
    graphs: DecodeGraphs | None
    _prompt_rows: bool

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
            return first_line(exc)
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


def prompt_rows_setting() -> str:
    """PDLAUNCH_PROMPT_ROWS (CUDA instances): `auto` (unset or empty), `off` (steps with prompts replay piecewise) or
    `ungrouped` (a program a prompt row); any other value is refused naming the variable."""
    return env_choice("PDLAUNCH_PROMPT_ROWS", ("auto", "off", "ungrouped"))
