"""Log-probabilities of prompt positions (vLLM's `prompt_logprobs`; completions' echo with logprobs).

The model runner computes logits only at the rows it samples from. A request whose params ask for
prompt logprobs also has its prompt rows computed: the logits at position p give the logprob of the
prompt token at p + 1. Only those rows, and only for those requests: a step without them is unchanged
(no extra work on the decode path, CUDA graphs untouched: such a step runs eagerly).

The [rows, V] logits are reduced in slices on the device (the token's logprob, its rank, the top k), so
a long prompt never holds [prompt_len, V] floats at once. Under chunked prefill each step adds the
positions of its chunk to the request (`Request.prompt_logprobs`, by position, so a recompute after
preemption overwrites rather than appends); the whole list leaves with the request's first output.
Requests asking for them take no prefix-cache hit: every prompt position must be computed here (the
same rule as vLLM's), and a PD decode, which loads the prompt's KV, is refused them (server side).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pdlaunch.engine.outputs import TokenLogprob
from pdlaunch.engine.request import Request

ROWS_PER_SLICE = 256  # [256, V] float32 at a time: 150 MiB for a 150k vocabulary


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


def positions_of(request: Request, start: int, end: int) -> range:
    """The positions in [start, end) whose logits give a prompt token's logprob (p + 1 is in the prompt)."""
    if not request.wants_prompt_logprobs:
        return range(0)
    return range(start, min(end, request.num_prompt_tokens - 1))


def prompt_rows(chunks: Sequence[tuple[Request, int, int]]) -> PromptRows:
    """Prompt rows of a step's chunks (request, start, end), laid out one after the other."""
    rows: list[int] = []
    targets: list[int] = []
    top_k = 0
    base = 0
    for request, start, end in chunks:
        positions = positions_of(request, start, end)
        if positions:
            rows.extend(base + p - start for p in positions)
            targets.extend(request.prompt_token_ids[p + 1] for p in positions)
            top_k = max(top_k, request.params.prompt_logprobs or 0)
        base += end - start
    return PromptRows(rows, targets, top_k)


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


def distribute(chunks: Sequence[tuple[Request, int, int]], result: PromptLogprobsOut) -> None:
    """Store each row's logprob on its request, at the position of the token it is the logprob of."""
    i = 0
    for request, start, end in chunks:
        k = request.params.prompt_logprobs or 0
        for p in positions_of(request, start, end):
            top = dict(zip(result.top_ids[i][:k], result.top_values[i][:k]))
            request.prompt_logprobs[p + 1] = TokenLogprob(request.prompt_token_ids[p + 1], result.logprobs[i], top,
                                                          rank=result.ranks[i])
            i += 1


def take(request: Request) -> list[TokenLogprob | None] | None:
    """The request's prompt logprobs (None for the first token, which nothing predicts), once, when they
    are all in; None when it did not ask or they were taken already."""
    if not request.wants_prompt_logprobs or len(request.prompt_logprobs) < request.num_prompt_tokens - 1:
        return None
    request.prompt_logprobs_sent = True
    return [None] + [request.prompt_logprobs[p] for p in range(1, request.num_prompt_tokens)]
