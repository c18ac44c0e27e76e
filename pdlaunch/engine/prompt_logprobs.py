"""Log-probabilities of prompt positions (vLLM's `prompt_logprobs`; completions' echo with logprobs).

The model runner computes logits only at the rows it samples from. A request whose params ask for
prompt logprobs also has its prompt rows computed: the logits at position p give the logprob of the
prompt token at p + 1. Only those rows, and only for those requests: a step without them is unchanged
(no extra work on the decode path, CUDA graphs untouched: such a step runs eagerly).

This module is the engine's side: which rows of a step those are, and storing the results on their
requests; the runner reduces the rows' logits on the device (runner/prompt_logprobs.py). Under
chunked prefill each step adds the positions of its chunk to the request (`Request.prompt_logprobs`,
by position, so a recompute after preemption overwrites rather than appends); the whole list leaves
with the request's first output.
Requests asking for them take no prefix-cache hit: every prompt position must be computed here (the
same rule as vLLM's), and a PD decode, which loads the prompt's KV, is refused them (server side).
"""

from __future__ import annotations

from collections.abc import Sequence

from pdlaunch.engine.outputs import TokenLogprob
from pdlaunch.engine.request import Request
from pdlaunch.runner.prompt_logprobs import PromptLogprobsOut, PromptRows


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
