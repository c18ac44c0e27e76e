"""Token sampling for a batch of requests, each with its own SamplingParams.

The logits first go through the grammar masks of structured-output requests
(engine/structured_output.py), then the requests' logits processors (engine/logits_processors.py:
allowed_token_ids, bad_words, min_tokens, logit_bias, penalties). Greedy rows (temperature below
SAMPLING_EPS, or top_k 1) take the argmax. Random rows scale by temperature (at least
MIN_RANDOM_TEMPERATURE, so the division stays finite), drop tokens below min_p times the most
likely one's probability, then (vLLM's order) of what is left keep the top_k logits and the smallest
set whose renormalized probability reaches top_p, then sample by the exponential race
(argmax p_i / E_i with E_i ~ Exp(1), which draws i with probability p_i). A seeded request draws
its E from its own generator, one draw of V values per token, so its tokens do not depend on what
else is in the batch, and its output token k comes from draw `seed_offset` + k of its seed's stream
(engine/first_token.py skips the earlier draws); unseeded requests share the engine's generator.

Logprobs are those of the model's distribution (log_softmax of the logits) after the grammar masks and before
processors, temperature, top_k and top_p (vLLM's default, raw logprobs: its model runner masks the logits by
the grammar before its sampler computes them). A token the grammar forbids has logprob -inf, reported as
LOGPROB_FLOOR (vLLM's -9999.0), since JSON has no infinity.

Decode steps replayed from CUDA graphs return logits like eager steps, and all of this runs after the
replay, outside the graph, except the greedy argmax: the graph ends with it (runner/cuda_graphs.py), and
`sample_ids` takes those ids unless a grammar or a processor changed the logits.

On CUDA the per-row parameters go to the device from pinned memory without blocking, so the one
host sync of a step is reading the chosen token ids back (`tolist`). The argmaxes are
`fused_ops.argmax_rows` (torch's argmax of a few long rows takes one block of threads per row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pdlaunch.engine.logits_processors import Encode, LogitsProcessors
from pdlaunch.engine.outputs import MIN_RANDOM_TEMPERATURE, SamplingParams, TokenLogprob
from pdlaunch.engine.structured_output import apply_grammar_masks
from pdlaunch.memory.platform import to_device_async
from pdlaunch.model.fused_ops import argmax_rows

if TYPE_CHECKING:
    from llguidance import LLMatcher

LOGPROB_FLOOR = -9999.0  # what a -inf logprob is reported as (vLLM's serving layer clamps to the same)
NO_TOKEN = -1  # the id sampled for a row whose grammar and processors left every logit at -inf


@dataclass
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_token_ids: Sequence[int] = field(default_factory=list)  # read by penalties
    output_token_ids: Sequence[int] = field(default_factory=list)  # penalties, min_tokens, bad_words
    matcher: LLMatcher | None = None  # llguidance matcher of a structured-output request (engine/structured_output.py)

    @property
    def grammar_stopped(self) -> bool:
        """Its grammar allows nothing but EOS now: complete (or failed, which the EOS then reports)."""
        return self.matcher is not None and self.matcher.is_stopped()


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    # row -> what its own host-side work raised (its grammar's mask, its bad words): that row's token means
    # nothing, the caller ends its request; every other row was sampled as if it were not in the batch
    failed: dict[int, Exception] = field(default_factory=dict)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top_k / top_p set to -inf.

    logits: [N, V] float32; top_k: [N] int64 (V = off); top_p: [N] float32 (1.0 = off).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    # keep the logits >= the k-th largest, as vLLM does: tokens tied with the k-th all stay
    kth = sorted_logits.gather(1, (top_k.clamp(1, logits.shape[-1]) - 1).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass of the tokens before it already reaches top_p (the first stays). Only in rows with
    # top_p < 1: the float32 running mass reaches 1.0 before a long tail's end, and a row with top_p 1 (off) kept its
    # tail when alone but lost it in a batch with another row's top_p (a seeded request's tokens then depended on it).
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def to_device(values: Sequence[float] | Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without a stream sync."""
    return to_device_async(torch.tensor(values, dtype=dtype), device)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the logits whose probability is below min_p x the row's largest (vLLM's MinPLogitsProcessor,
    on the temperature-scaled logits). logits: [N, V] float32; min_p: [N] (0 = off)."""
    probs = logits.softmax(dim=-1)
    floor = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < floor, float("-inf"))


class Sampler:
    def __init__(self, device: torch.device | str, seed: int = 0, eos_token_ids: Sequence[int] = (),
                 encode: Encode | None = None) -> None:
        """`eos_token_ids`: what min_tokens holds back; `encode`: text -> ids without special
        tokens, for bad_words."""
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.processors = LogitsProcessors(eos_token_ids, encode)

    def new_request_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SampleRow],
                 argmax: torch.Tensor | None = None) -> SamplerOutput:
        """logits: [N, V] float32, one row per request in `rows`; argmax: their argmax when already computed (the
        decode graph does), used as the greedy ids where nothing changes the logits."""
        failed: dict[int, Exception] = {}
        masked = apply_grammar_masks(logits, [r.matcher for r in rows], failed)
        chosen = self._sample_masked(masked, rows, argmax, masked is not logits, failed)
        token_ids = chosen.tolist()
        return SamplerOutput(token_ids, self._logprobs(masked, rows, chosen, token_ids), failed)

    def sample_ids(self, logits: torch.Tensor, rows: Sequence[SampleRow], argmax: torch.Tensor | None = None,
                   failed: dict[int, Exception] | None = None) -> torch.Tensor:
        """The chosen token ids [N] long, left on the logits' device (no host sync). `argmax`: the raw logits'
        argmax when already computed; the greedy ids unless a grammar or a processor changed the logits.
        `failed`: where a row whose own grammar or processors raise is recorded (SamplerOutput.failed); without
        it the exception propagates."""
        masked = apply_grammar_masks(logits, [r.matcher for r in rows], failed)
        return self._sample_masked(masked, rows, argmax, masked is not logits, failed)

    def _sample_masked(self, logits: torch.Tensor, rows: Sequence[SampleRow], argmax: torch.Tensor | None,
                       grammar_masked: bool, failed: dict[int, Exception] | None) -> torch.Tensor:
        """sample_ids after the grammar masks (`grammar_masked`: they changed the logits, so `argmax`, that of the
        logits before them, no longer holds)."""
        num_rows, vocab = logits.shape
        masked = logits
        logits = self.processors(logits, rows, failed)  # returns its input when no row needs it
        changed = grammar_masked or logits is not masked
        chosen = argmax if argmax is not None and not changed else argmax_rows(logits)
        blocked = logits.amax(dim=-1) == float("-inf") if changed else None  # [N] bool
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            dev = logits.device
            idx = to_device(random_rows, torch.long, dev)
            sub = logits.index_select(0, idx)
            temps = to_device([rows[i].params.temperature for i in random_rows], sub.dtype, dev)
            # SamplingParams already keeps temperatures >= MIN_RANDOM_TEMPERATURE; the clamp keeps the
            # division finite for params built without validation (model_construct).
            sub = sub / temps.clamp_min(MIN_RANDOM_TEMPERATURE).unsqueeze(1)
            # min_p before top_k / top_p, as vLLM: top_p then measures the mass of what min_p left
            min_p = [rows[i].params.min_p for i in random_rows]
            if any(min_p):
                sub = apply_min_p(sub, to_device(min_p, sub.dtype, dev))
            top_k = [rows[i].params.top_k if rows[i].params.top_k > 0 else vocab for i in random_rows]
            top_p = [rows[i].params.top_p for i in random_rows]
            if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
                sub = apply_top_k_top_p(sub, to_device(top_k, torch.long, dev), to_device(top_p, sub.dtype, dev))
            probs = sub.softmax(dim=-1)
            race = torch.empty_like(probs)
            shared = [j for j, i in enumerate(random_rows) if rows[i].generator is None]
            if shared:
                race[shared] = torch.empty(len(shared), vocab, device=logits.device).exponential_(
                    generator=self.generator)
            for j, i in enumerate(random_rows):
                gen = rows[i].generator
                if gen is not None:
                    race[j] = torch.empty(vocab, device=logits.device).exponential_(generator=gen)
            chosen = chosen.index_copy(0, idx, argmax_rows(probs / race))
        return chosen if blocked is None else chosen.masked_fill(blocked, NO_TOKEN)

    @staticmethod
    def _logprobs(logits: torch.Tensor, rows: Sequence[SampleRow], chosen: torch.Tensor,
                  token_ids: list[int]) -> list[TokenLogprob | None]:
        wanted = [r.params.logprobs for r in rows]
        if all(n is None for n in wanted):
            return [None] * len(rows)
        # a grammar's forbidden tokens are -inf; a row whose grammar forbids every token (NO_TOKEN) is all NaN
        logp = torch.nan_to_num(logits.log_softmax(dim=-1), nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR)
        chosen_lp = logp.gather(1, chosen.clamp_min(0).unsqueeze(1)).squeeze(1).tolist()
        top_n = max(n or 0 for n in wanted)
        top_vals, top_ids = (logp.topk(top_n, dim=-1) if top_n else (None, None))
        out: list[TokenLogprob | None] = []
        for i, n in enumerate(wanted):
            if n is None:
                out.append(None)
                continue
            top = {}
            if n and top_ids is not None and top_vals is not None:
                top = dict(zip(top_ids[i, :n].tolist(), top_vals[i, :n].tolist()))
            out.append(TokenLogprob(token_ids[i], chosen_lp[i], top))
        return out
