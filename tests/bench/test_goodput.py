"""Goodput/SLO arithmetic of `bench compare` and the "highest rate within 90%" rule (no processes)."""

from __future__ import annotations

from typing import Any

import pytest

from pdlaunch.bench.goodput import (
    Slo,
    count_long_gaps,
    count_within,
    highest_rate_within,
    meets_slo,
    rate_point,
    request_tpot_s,
)
from pdlaunch.bench.report import parse_goodput

SLO = Slo(ttft_ms=400, tpot_ms=15)


def test_tpot_excludes_the_first_token_and_is_zero_for_one_token() -> None:
    # 0.1 s to the first token, then 9 more tokens in 0.09 s: 10 ms per output token
    assert request_tpot_s(0.1, 0.19, 10) == pytest.approx(0.01)
    assert request_tpot_s(0.1, 0.1, 1) == 0.0


@pytest.mark.parametrize(("ok", "ttft", "e2el", "out", "within"), [
    (True, 0.400, 0.400 + 9 * 0.0149, 10, True),   # TTFT exactly at the SLO: within
    (True, 0.401, 0.401 + 9 * 0.010, 10, False),   # TTFT 1 ms over
    (True, 0.100, 0.100 + 9 * 0.016, 10, False),   # TPOT 1 ms over
    (True, 0.100, 5.000, 1, True),                 # one output token: TPOT counts 0
    (False, 0.010, 0.020, 10, False),              # failed: never within, however fast
])
def test_meets_slo(ok: bool, ttft: float, e2el: float, out: int, within: bool) -> None:
    assert meets_slo(SLO, ok, ttft, e2el, out) is within


def _doc(rows: list[tuple[str, float, float, int]], duration: float) -> dict[str, Any]:
    """A `bench serve` result document with only what rate_point reads."""
    completed = sum(1 for err, *_ in rows if not err)
    return {
        "errors": [r[0] for r in rows], "ttfts": [r[1] for r in rows], "e2els": [r[2] for r in rows],
        "output_lens": [r[3] for r in rows], "duration": duration, "completed": completed,
        "request_throughput": completed / duration, "median_ttft_ms": 120.0, "p99_ttft_ms": 900.0,
        "median_tpot_ms": 11.0, "p99_tpot_ms": 30.0, "p99_itl_ms": 40.0,
    }


def test_rate_point_counts_goodput_over_the_duration_and_share_over_all_requests() -> None:
    doc = _doc([
        ("", 0.1, 0.1 + 127 * 0.010, 128),   # within
        ("", 0.5, 0.5 + 127 * 0.010, 128),   # TTFT over
        ("", 0.1, 0.1 + 127 * 0.020, 128),   # TPOT over
        ("HTTP 500: boom", 0.0, 0.0, 0),     # failed
        ("", 0.2, 0.2 + 127 * 0.012, 128),   # within
    ], duration=2.0)
    assert count_within(doc, SLO) == 2
    point = rate_point(4.0, doc, SLO)
    assert point.within_slo == 2 and point.num_prompts == 5 and point.completed == 4
    assert point.goodput == pytest.approx(1.0)       # 2 requests / 2 s
    assert point.served == pytest.approx(2.0)        # 4 completed / 2 s
    assert point.within_share == pytest.approx(0.4)  # failed requests count against the share
    assert (point.ttft_p50_ms, point.ttft_p99_ms, point.tpot_p50_ms, point.tpot_p99_ms) == (120.0, 900.0, 11.0, 30.0)
    # the tight set (TTFT <= 1 s, TPOT <= 10 ms) takes the slow first token, not the 12 ms TPOT
    tight = rate_point(4.0, doc, SLO, Slo(ttft_ms=1000, tpot_ms=10))
    assert tight.within_slo == 2 and tight.tight_within_slo == 2 and tight.tight_goodput == pytest.approx(1.0)
    assert count_within(doc, Slo(ttft_ms=1000, tpot_ms=10)) == 2 and tight.itl_p99_ms == 40.0


def _points(shares: dict[float, float]) -> list[Any]:
    """RatePoints at each rate with `share` of 100 requests within the SLOs."""
    rows = []
    for rate, share in shares.items():
        n_good = round(100 * share)
        doc = _doc([("", 0.1, 0.11, 2)] * n_good + [("", 9.0, 9.1, 2)] * (100 - n_good), duration=10.0)
        rows.append(rate_point(rate, doc, SLO))
    return rows


def test_highest_rate_within_is_the_top_of_the_run_of_passing_rates() -> None:
    assert highest_rate_within(_points({2: 1.0, 4: 0.95, 8: 0.5})) == 4
    assert highest_rate_within(_points({2: 1.0, 4: 0.9, 8: 0.89})) == 4        # exactly 90% passes
    assert highest_rate_within(_points({8: 0.99, 2: 1.0, 4: 0.97})) == 8      # order of the list does not matter
    # a pass above a failed lower rate is noise, not capacity
    assert highest_rate_within(_points({2: 1.0, 4: 0.7, 8: 0.95})) == 2
    assert highest_rate_within(_points({2: 0.5, 4: 0.95})) is None
    assert highest_rate_within(_points({2: 0.8, 4: 0.6}), share=0.75) == 2


def test_rate_point_counts_the_clients_token_gaps_of_50_ms_or_more() -> None:
    doc = _doc([("", 0.1, 0.5, 4), ("", 0.1, 0.5, 4)], duration=1.0)
    doc["itls"] = [[0.008, 0.05, 0.2], [0.049, 0.01, 0.0]]
    assert count_long_gaps(doc) == 2 and rate_point(4.0, doc, SLO).long_itl_gaps == 2  # 50 ms counts
    assert count_long_gaps(_doc([("", 0.1, 0.5, 4)], duration=1.0)) == 0  # a document without per-request gaps
    doc["itls"] = [[0.008, "slow"], []]
    with pytest.raises(ValueError, match="itls"):
        count_long_gaps(doc)


def test_the_slos_handed_to_bench_serve_are_the_ones_given() -> None:
    """`bench compare --tpot-slo-ms 12.3456789` ran each rate's `bench serve` with tpot:12.3457 (`:g` keeps six
    digits), so the raw documents' request_goodput and goodput_slos_ms held a rounded SLO beside compare's own."""
    slo = Slo(ttft_ms=1234567.0, tpot_ms=12.3456789)
    assert parse_goodput(slo.as_goodput_specs()) == {"ttft": 1234567.0, "tpot": 12.3456789}
    assert Slo(ttft_ms=400, tpot_ms=15).as_goodput_specs() == ["ttft:400", "tpot:15"]
