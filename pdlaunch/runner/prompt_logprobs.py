"""Prompt logprobs on the device: reduce the logits of a step's prompt rows (vLLM's `prompt_logprobs`).

Which rows those are, and which request each result belongs to, is the engine's bookkeeping
(engine/prompt_logprobs.py). Here the [rows, V] logits are reduced in slices on the device (the
target token's logprob, its rank, the top k), so a long prompt never holds [prompt_len, V] floats at
once. A step without prompt rows never gets here (no extra work on the decode path, CUDA graphs
untouched: such a step runs eagerly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ROWS_PER_SLICE = 256  # [256, V] float32 at a time: 150 MiB for a 150k vocabulary
LOGPROB_FLOOR = -9999.0  # a -inf or NaN logprob, as the sampler reports it (engine/sampler.py): JSON has no infinity


@dataclass
class PromptRows:
    """The prompt rows of one step, in scheduled order."""

    rows: list[int]  # token rows of the step's batch
    targets: list[int]  # the prompt token each row's logits predict
    top_k: int  # the most alternatives any of these requests asks for


@dataclass
class PromptLogprobsOut:
    """Per prompt row: the target token's logprob and rank, and the top_k alternatives."""

    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_values: list[list[float]]


@torch.inference_mode()
def compute(logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, rows: PromptRows
            ) -> PromptLogprobsOut:
    """Reduce the prompt rows' logits. `logits_of`: hidden [n, H] -> float32 logits [n, V] (every TP
    rank calls it alike, so its collectives pair up)."""
    dev = hidden.device
    out = PromptLogprobsOut([], [], [], [])
    for first in range(0, len(rows.rows), ROWS_PER_SLICE):
        index = torch.tensor(rows.rows[first:first + ROWS_PER_SLICE], device=dev)
        target = torch.tensor(rows.targets[first:first + ROWS_PER_SLICE], device=dev).unsqueeze(1)
        logp = logits_of(hidden.index_select(0, index)).log_softmax(dim=-1)  # [n, V]
        # a -inf logit (a token the model rules out) or a NaN row (an overflowed forward) would reach the answer's JSON
        logp = torch.nan_to_num(logp, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR)
        chosen = logp.gather(1, target)  # [n, 1]
        out.logprobs += chosen.squeeze(1).tolist()
        out.ranks += ((logp > chosen).sum(dim=-1) + 1).tolist()
        if rows.top_k:
            values, ids = logp.topk(rows.top_k, dim=-1)
            out.top_ids += ids.tolist()
            out.top_values += values.tolist()
        else:
            out.top_ids += [[] for _ in range(index.numel())]
            out.top_values += [[] for _ in range(index.numel())]
    return out
