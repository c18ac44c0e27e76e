"""Per-request logits processing for a batch, before the sampler picks tokens.

In vLLM's order: allowed_token_ids (everything else to -inf), bad_words, min_tokens (EOS and stop
ids to -inf until min_tokens are out, unless a complete grammar allows nothing but EOS), logit_bias
(added), then the penalties on the raw model scores: repetition (prompt and output tokens: positive
logits divided, negative multiplied), frequency (minus penalty x count in the output) and presence
(minus penalty once a token is in the output).

Batched: each kind of change is gathered over the rows into flat (row, token[, value]) index lists
and applied with one scatter / index_put on the device; Python walks requests and their token
lists, never the vocabulary. Rows that need none of this cost nothing (the all-greedy step of a
plain batch is unchanged): `SamplingParams.processes_logits` selects the rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import EngineError
from pdlaunch.memory.platform import to_device_async

Encode = Callable[[str], list[int]]
BAD_WORDS_CACHE = 4096  # tokenized bad words kept between steps


class RowState(Protocol):
    """What the processors read of one request (engine/sampler.py SampleRow)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]

    @property
    def grammar_stopped(self) -> bool:
        """Its structured output's grammar allows nothing but EOS now."""


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """EngineError naming the field when logit_bias or allowed_token_ids hold an id the model lacks (it would index
    past the logits inside a step), or stop_token_ids does (no sampled token can match it: silently ignored)."""
    for name, ids in (("logit_bias", params.logit_bias.keys()), ("allowed_token_ids", params.allowed_token_ids or ()),
                      ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise EngineError(f"{name} holds token id {bad[0]} out of the vocabulary [0, {vocab_size})",
                              field=name, hint=f"use token ids below {vocab_size}")


def check_in_vocab(token_ids: Sequence[int], vocab_size: int, field: str) -> None:
    """EngineError naming `field`, the first id outside [0, vocab_size) and where it is (the model has no row
    for it: it would index past the embedding)."""
    for i, t in enumerate(token_ids):
        if not 0 <= t < vocab_size:
            raise EngineError(f"{field}[{i}] is token id {t}, outside the model's vocabulary [0, {vocab_size})",
                              field=field, hint=f"send token ids from 0 to {vocab_size - 1} (the checkpoint's "
                              "vocab_size), as /tokenize gives them")


def _flat(pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, tokens = zip(*pairs)
    return (to_device_async(torch.tensor(rows, dtype=torch.long), device),
            to_device_async(torch.tensor(tokens, dtype=torch.long), device))


class LogitsProcessors:
    def __init__(self, eos_token_ids: Sequence[int], encode: Encode | None = None) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self._encode = encode
        self._bad_words: dict[str, tuple[tuple[int, ...], ...]] = {}  # word -> its token sequences

    def bad_word_token_ids(self, word: str) -> tuple[tuple[int, ...], ...]:
        """Token sequences of a bad word, as vLLM bans them: the word alone and after a space."""
        if word not in self._bad_words:
            if self._encode is None:
                raise EngineError("bad_words needs a tokenizer", field="bad_words")
            if len(self._bad_words) >= BAD_WORDS_CACHE:
                self._bad_words.clear()
            seqs = {tuple(self._encode(text)) for text in (word.lstrip(), " " + word.lstrip())}
            self._bad_words[word] = tuple(sorted(s for s in seqs if s))
        return self._bad_words[word]

    def __call__(self, logits: torch.Tensor, rows: Sequence[RowState],
                 failed: dict[int, Exception] | None = None) -> torch.Tensor:
        """logits: [N, V] float32; returns the processed logits (a new tensor when any row needs it). With `failed`,
        a row whose own processing raises (its bad words cannot be tokenized) is recorded there (row -> exception)
        and left unprocessed, and so is a row already in it; without it the exception propagates."""
        picked = [i for i, r in enumerate(rows) if r.params.processes_logits and (failed is None or i not in failed)]
        banned = self._banned(rows, picked, failed)
        if failed:
            picked = [i for i in picked if i not in failed]
        if not picked:
            return logits
        logits = logits.clone()  # the raw scores still give the logprobs
        dev = logits.device
        allowed = [(i, t) for i in picked for t in (rows[i].params.allowed_token_ids or ())]
        if allowed:
            keep = torch.zeros_like(logits, dtype=torch.bool)
            masked = to_device_async(torch.tensor(sorted({i for i, _ in allowed}), dtype=torch.long), dev)
            keep[_flat(allowed, dev)] = True
            keep_rows = keep.index_select(0, masked)
            logits.index_copy_(0, masked, logits.index_select(0, masked).masked_fill(~keep_rows, float("-inf")))
        if banned:
            logits[_flat(banned, dev)] = float("-inf")
        bias = [(i, t, b) for i in picked for t, b in rows[i].params.logit_bias.items()]
        if bias:
            r, t = _flat([(i, t) for i, t, _ in bias], dev)
            values = to_device_async(torch.tensor([b for _, _, b in bias], dtype=logits.dtype), dev)
            logits.index_put_((r, t), values, accumulate=True)
        penalized = [i for i in picked if _has_penalty(rows[i].params)]
        if penalized:
            self._penalize(logits, rows, penalized)
        return logits

    def _banned(self, rows: Sequence[RowState], picked: list[int],
                failed: dict[int, Exception] | None) -> list[tuple[int, int]]:
        """(row, token) pairs set to -inf: stop ids before min_tokens, the last token of a bad word
        whose other tokens end the output. A row that raises goes to `failed` (when given) with none."""
        out: list[tuple[int, int]] = []
        for i in picked:
            try:
                out.extend(self._banned_row(i, rows[i]))
            except Exception as exc:
                if failed is None:
                    raise
                failed[i] = exc
        return out

    def _banned_row(self, i: int, row: RowState) -> list[tuple[int, int]]:
        p = row.params
        out: list[tuple[int, int]] = []
        # With ignore_eos too: vLLM holds EOS back until min_tokens whether or not it would stop the request; but not
        # once a grammar is complete: its EOS is all it allows (vLLM lets it through, and it ends the request)
        if len(row.output_token_ids) < p.min_tokens and not row.grammar_stopped:
            stops = list(p.stop_token_ids) + self.eos_token_ids
            out.extend((i, t) for t in stops)
        for word in p.bad_words:
            for seq in self.bad_word_token_ids(word):
                before = len(seq) - 1
                if before == 0 or list(row.output_token_ids[-before:]) == list(seq[:-1]):
                    out.append((i, seq[-1]))
        return out

    @staticmethod
    def _penalize(logits: torch.Tensor, rows: Sequence[RowState], penalized: list[int]) -> None:
        """Only the logits of tokens that occurred change, so the work is over (row, token) pairs
        (prompt and output lengths), never over [rows, vocab]."""
        dev = logits.device
        vocab = logits.shape[1]
        flat = logits.view(-1)  # a fresh contiguous clone (__call__)
        params = [rows[i].params for i in penalized]
        out_keys = _keys(penalized, [rows[i].output_token_ids for i in penalized], vocab, dev)
        rep = [p.repetition_penalty for p in params]
        if any(r != 1.0 for r in rep):
            prompts = [rows[i].prompt_token_ids if p.repetition_penalty != 1.0 else ()
                       for i, p in zip(penalized, params)]
            keys = torch.unique(torch.cat([out_keys, _keys(penalized, prompts, vocab, dev)]))
            per_row = torch.ones(logits.shape[0], dtype=logits.dtype)
            per_row[penalized] = torch.tensor(rep, dtype=logits.dtype)
            penalty = to_device_async(per_row, dev)[keys // vocab]
            values = flat[keys]
            flat[keys] = torch.where(values > 0, values / penalty, values * penalty)
        if out_keys.numel() and any(p.frequency_penalty or p.presence_penalty for p in params):
            keys, counts = torch.unique(out_keys, return_counts=True)
            freq = torch.zeros(logits.shape[0], dtype=logits.dtype)
            pres = torch.zeros(logits.shape[0], dtype=logits.dtype)
            freq[penalized] = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype)
            pres[penalized] = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype)
            row = keys // vocab
            flat[keys] -= to_device_async(freq, dev)[row] * counts.to(logits.dtype) + to_device_async(pres, dev)[row]


def _keys(batch_rows: Sequence[int], token_lists: Sequence[Sequence[int]], vocab: int,
          device: torch.device) -> torch.Tensor:
    """row * vocab + token for every token of every list (row: the list's batch row), on `device`."""
    lens = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    flat = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long).clamp_(0, vocab - 1)
    keys = torch.repeat_interleave(torch.tensor(list(batch_rows), dtype=torch.long), lens) * vocab + flat
    return to_device_async(keys, device)


def _has_penalty(p: SamplingParams) -> bool:
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)

