"""The workload of `pdlaunch bench serve`: random prompts (token ids, or words for chat endpoints) with random
lengths around the asked ones, and arrivals as a gamma process (Poisson at burstiness 1, like vLLM)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pdlaunch.bench.serve_config import MIN_TOKEN_ID, ServeBenchConfig

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we their can has been if more when will would who "
    "so no time about many then them these some could other two into first like new only year"
).split()


@dataclass
class BenchRequest:
    prompt: list[int] | str
    prompt_len: int  # tokens for id prompts, words for word prompts
    output_len: int
    messages: list[dict[str, str]] | None = None  # chat: the whole conversation (multi_turn.py), not `prompt`
    return_token_ids: bool = False  # ask for the output's token ids (multi_turn.py)


def length_range(mean: int, ratio: float) -> tuple[int, int]:
    """The shortest and longest length drawn around `mean`: mean * [1 - ratio, 1 + ratio] rounded outwards to whole
    tokens, the products first rounded off their floating-point error (100 * (1 + 0.1) is 110.00000000000001,
    whose ceiling drew 111-token lengths)."""
    low = max(1, math.floor(round(mean * (1 - ratio), 9)))
    return low, max(low, math.ceil(round(mean * (1 + ratio), 9)))


def _lengths(mean: int, ratio: float, n: int, rng: np.random.Generator) -> np.ndarray:
    low, high = length_range(mean, ratio)
    return rng.integers(low, high + 1, size=n)


def sample_requests(cfg: ServeBenchConfig, n: int, rng: np.random.Generator) -> list[BenchRequest]:
    """`n` prompts with input/output lengths uniform in mean * [1 - ratio, 1 + ratio], or with `input_lens`: each
    length of the list for an equal share of the prompts (the first ones one more where n is not a multiple), in a
    seeded random order."""
    fmt = cfg.prompt_format or ("words" if cfg.is_chat else "ids")
    if cfg.input_lens is not None:
        in_lens = rng.permutation(np.resize(np.array(cfg.input_lens), n))
    else:
        in_lens = _lengths(cfg.random_input_len, cfg.random_range_ratio, n, rng)
    out_lens = _lengths(cfg.random_output_len, cfg.random_range_ratio, n, rng)
    requests = []
    for in_len, out_len in zip(in_lens.tolist(), out_lens.tolist()):
        if fmt == "ids":
            prompt: list[int] | str = rng.integers(MIN_TOKEN_ID, cfg.vocab_size, size=in_len).tolist()
        else:
            prompt = " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=in_len).tolist())
        requests.append(BenchRequest(prompt=prompt, prompt_len=in_len, output_len=out_len))
    return requests


def arrival_times(n: int, request_rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send offsets (s) of `n` requests: the first at 0, then gamma(burstiness, 1/(rate*burstiness))
    gaps, whose mean is 1/rate and coefficient of variation 1/sqrt(burstiness)."""
    if math.isinf(request_rate):
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / request_rate / burstiness, size=n - 1)  # the product may underflow
    return np.concatenate([[0.0], np.cumsum(gaps)])
