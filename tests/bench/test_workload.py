"""bench serve workload: the arrival process (rate, count, burstiness) and random prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdlaunch.bench.serve_config import MIN_TOKEN_ID, ServeBenchConfig
from pdlaunch.bench.workload import arrival_times, length_range, sample_requests


def test_arrivals_count_and_order() -> None:
    times = arrival_times(500, request_rate=10.0, burstiness=1.0, rng=np.random.default_rng(0))
    assert len(times) == 500
    assert times[0] == 0.0
    assert np.all(np.diff(times) >= 0)


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_arrival_gaps_have_mean_one_over_rate_and_gamma_spread(burstiness: float) -> None:
    rate = 20.0
    gaps = np.diff(arrival_times(40_001, rate, burstiness, np.random.default_rng(1)))
    assert gaps.mean() == pytest.approx(1.0 / rate, rel=0.03)
    # gamma(k, theta): coefficient of variation 1/sqrt(k); Poisson (k = 1) has CV 1
    assert gaps.std() / gaps.mean() == pytest.approx(1.0 / math.sqrt(burstiness), rel=0.05)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert np.array_equal(arrival_times(7, math.inf, 1.0, np.random.default_rng(0)), np.zeros(7))


def test_random_prompts_have_asked_lengths_and_safe_ids() -> None:
    cfg = ServeBenchConfig(base_url="http://x", random_input_len=32, random_output_len=8, vocab_size=100)
    reqs = sample_requests(cfg, 50, np.random.default_rng(0))
    assert len(reqs) == 50
    for r in reqs:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len == 32
        assert r.output_len == 8
        assert min(r.prompt) >= MIN_TOKEN_ID and max(r.prompt) < 100


def test_range_ratio_spreads_lengths_within_bounds() -> None:
    cfg = ServeBenchConfig(base_url="http://x", random_input_len=100, random_output_len=10, random_range_ratio=0.5)
    reqs = sample_requests(cfg, 400, np.random.default_rng(0))
    in_lens = [r.prompt_len for r in reqs]
    out_lens = [r.output_len for r in reqs]
    assert min(in_lens) >= 50 and max(in_lens) <= 150 and len(set(in_lens)) > 20
    assert min(out_lens) >= 5 and max(out_lens) <= 15


def test_chat_endpoint_uses_word_prompts() -> None:
    cfg = ServeBenchConfig(base_url="http://x/v1", endpoint="/v1/chat/completions", random_input_len=12)
    assert cfg.url == "http://x/v1/chat/completions"
    assert cfg.models_url == "http://x/v1/models"
    (req,) = sample_requests(cfg, 1, np.random.default_rng(0))
    assert isinstance(req.prompt, str) and len(req.prompt.split()) == 12


def test_token_id_prompts_are_refused_for_chat() -> None:
    with pytest.raises(ValueError, match="prompt-format words"):
        ServeBenchConfig(base_url="http://x", endpoint="/v1/chat/completions", prompt_format="ids")


def test_input_lens_give_each_length_an_equal_share_in_a_seeded_order() -> None:
    cfg = ServeBenchConfig(base_url="http://x", input_lens=[64, 3072], random_output_len=8)
    reqs = sample_requests(cfg, 41, np.random.default_rng(3))
    lens = [r.prompt_len for r in reqs]
    assert sorted(set(lens)) == [64, 3072] and lens.count(64) == 21 and lens.count(3072) == 20
    assert [len(r.prompt) for r in reqs] == lens and all(r.output_len == 8 for r in reqs)
    assert lens != sorted(lens) and lens != [64, 3072] * 20 + [64]  # shuffled, not in blocks or alternating
    again = sample_requests(cfg, 41, np.random.default_rng(3))
    assert [r.prompt for r in again] == [r.prompt for r in reqs]


@pytest.mark.parametrize(("extra", "message"), [
    ({"random_input_len": 100}, "--random-input-len and --input-lens"),
    ({"random_range_ratio": 0.5}, "--random-range-ratio"),
    ({"multi_turn": True}, "--input-lens"),
])
def test_input_lens_refuse_the_flags_they_replace(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServeBenchConfig(base_url="http://x", input_lens=[64, 3072], **extra)


@pytest.mark.parametrize(("mean", "ratio", "low", "high"), [(100, 0.1, 90, 110), (1000, 0.1, 900, 1100),
                                                            (10, 0.7, 3, 17), (80, 0.2, 64, 96)])
def test_range_ratio_bounds_are_the_asked_products_not_their_rounding_error(mean: int, ratio: float, low: int,
                                                                            high: int) -> None:
    """100 x (1 + 0.1) is 110.00000000000001 in floating point, and its ceiling drew 111-token lengths (and the
    served-length check counted 111): the range is mean x [1 - ratio, 1 + ratio] as typed."""
    cfg = ServeBenchConfig(base_url="http://x", random_input_len=mean, random_output_len=mean,
                           random_range_ratio=ratio)
    reqs = sample_requests(cfg, 2000, np.random.default_rng(0))
    for lengths in ([r.prompt_len for r in reqs], [r.output_len for r in reqs]):
        assert (min(lengths), max(lengths)) == (low, high)
    assert length_range(mean, ratio) == (low, high)  # what the served-length check counts
