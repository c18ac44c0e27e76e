"""The P:D advisor's arithmetic and the engine-load figures it is fed (no processes)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from pdlaunch.bench.advisor import (
    DecodeFit,
    DecodePoint,
    advise,
    decode_capacity,
    fit_decode,
    prefill_times,
    within_ttft,
    workload,
)
from pdlaunch.bench.engine_load import (
    InstanceTotals,
    StepTotals,
    engine_load,
    parse_instance,
    parse_long_gaps,
    parse_step_totals,
)


def test_fit_decode_is_least_squares_and_flat_for_one_batch_or_noise() -> None:
    fit = fit_decode([DecodePoint(batch=8, step_ms=6.0), DecodePoint(batch=24, step_ms=8.0),
                      DecodePoint(batch=40, step_ms=10.0)])
    assert fit.intercept_ms == pytest.approx(5.0) and fit.slope_ms == pytest.approx(0.125)
    assert fit_decode([DecodePoint(batch=16, step_ms=7.0)] * 2) == DecodeFit(intercept_ms=7.0, slope_ms=0.0)
    falling = fit_decode([DecodePoint(batch=8, step_ms=9.0), DecodePoint(batch=16, step_ms=7.0)])
    assert falling == DecodeFit(intercept_ms=8.0, slope_ms=0.0)
    with pytest.raises(ValueError):
        fit_decode([])


def test_decode_capacity_at_the_tpot_target() -> None:
    fit = DecodeFit(intercept_ms=5.0, slope_ms=0.125)
    assert decode_capacity(fit, 15.0, 256) == pytest.approx(80.0)  # (15 - 5) / 0.125
    assert decode_capacity(fit, 15.0, 64) == 64.0  # max_num_seqs caps it
    assert decode_capacity(DecodeFit(intercept_ms=7.0, slope_ms=0.0), 15.0, 64) == 64.0
    assert decode_capacity(DecodeFit(intercept_ms=20.0, slope_ms=0.1), 15.0, 64) == 0.0  # one sequence misses


def test_the_prompt_token_cap_keeps_the_largest_measured_batch_within_the_tpot_target() -> None:
    # t(b) = 5 + 0.125 b ms; the largest batch measured is 40 (10 ms), so 5 ms of a 15 ms step are left for
    # prompt tokens at 30000 tokens/s: 150 tokens.
    points = [DecodePoint(batch=8, step_ms=6.0), DecodePoint(batch=40, step_ms=10.0)]
    advice = advise(2, 3000, 100, 15.0, 30000.0, points, 256)
    assert advice.cap_batch == 40.0 and advice.prompt_token_cap() == 150
    assert advice.prompt_token_cap(8) == 270  # (15 - 6) ms x 30 tokens/ms
    assert advice.prompt_token_cap(120) == 0  # the decodes alone take 20 ms
    # the 2x H200 run of the fiftieth session: a flat 5.717 ms step, 39091 tokens/s, relaxed and tight targets
    h200 = [DecodePoint(batch=30, step_ms=5.717)]
    assert advise(2, 1568, 128, 15.0, 39091.0, h200, 256).prompt_token_cap() == 362
    assert advise(2, 1568, 128, 10.0, 39091.0, h200, 256).prompt_token_cap() == 167


def test_advise_picks_the_split_with_the_highest_sustained_rate() -> None:
    # prefill 30000 tokens/s per GPU at 3000-token prompts: 10 req/s per prefill GPU.
    # decode t(b) = 5 + 0.125 b ms, TPOT 15 ms: 80 sequences at 15 ms for 100 tokens = 1.5 s each: 53.3 req/s.
    points = [DecodePoint(batch=8, step_ms=6.0), DecodePoint(batch=40, step_ms=10.0)]
    advice = advise(4, 3000, 100, 15.0, 30000.0, points, 256)
    assert advice.decode_sequences == pytest.approx(80.0)
    rates = {s.label: (s.prefill_rate, s.decode_rate, s.sustained_rate) for s in advice.splits}
    assert rates["1P3D"] == pytest.approx((10.0, 160.0, 10.0))
    assert rates["3P1D"] == pytest.approx((30.0, 160.0 / 3, 30.0))
    assert advice.best.label == "3P1D" and advice.best.sustained_rate == pytest.approx(30.0)
    assert [advice.best.goodput(r) for r in (10.0, 40.0)] == pytest.approx([10.0, 30.0])
    assert "advice for 4 GPUs: 3P1D" in advice.sentence() and "prefill-bound" in advice.sentence()

    # a slow decode (long outputs) moves GPUs to the decode side
    long_outputs = advise(4, 3000, 2000, 15.0, 30000.0, points, 256)
    # 80 sequences for 2000 x 15 ms = 30 s each: 2.67 req/s per decode GPU. 1P3D 8, 2P2D 5.33, 3P1D 2.67
    assert long_outputs.best.label == "1P3D" and long_outputs.best.sustained_rate == pytest.approx(8.0)
    assert "decode-bound" in long_outputs.sentence()
    # no decode capacity at the target: every split sustains 0, and the advice says no split meets the SLOs
    none = advise(2, 100, 10, 1.0, 1000.0, points, 64)
    assert none.best.sustained_rate == 0.0 and none.unmet is not None
    with pytest.raises(ValueError):
        advise(1, 100, 10, 15.0, 1000.0, points, 64)
    with pytest.raises(ValueError, match="prefill rate"):
        advise(2, 100, 10, 15.0, 0.0, points, 64)


def test_within_ttft_is_the_m_m_1_wait_within_the_slack() -> None:
    # mu 10 req/s: 0.1 s of prefill; TTFT 0.4 s leaves 0.3 s to wait; at lam 5, P(wait > 0.3) = 0.5 e^-1.5
    assert within_ttft(5.0, 10.0, 0.4) == pytest.approx(1 - 0.5 * math.exp(-1.5))
    assert within_ttft(0.0, 10.0, 0.4) == 1.0
    assert within_ttft(10.0, 10.0, 0.4) == 0.0 and within_ttft(12.0, 10.0, 0.4) == 0.0  # rho >= 1: the queue grows
    assert within_ttft(0.0, 10.0, 0.05) == 0.0  # the prefill alone takes longer than the target


def test_a_ttft_target_moves_the_advice_to_the_prefill_side() -> None:
    """Sustained rates treat a prefill GPU as done at 100% busy; with a TTFT target its queue decides first."""
    points = [DecodePoint(batch=16, step_ms=7.0), DecodePoint(batch=64, step_ms=13.0)]  # t(b) = 5 + 0.125 b
    plain = advise(4, 3000, 300, 15.0, 30000.0, points, 256)
    assert plain.best.label == "2P2D" and plain.best.sustained_rate == pytest.approx(20.0)  # 3P1D: 17.8
    advice = advise(4, 3000, 300, 15.0, 30000.0, points, 256, ttft_target_ms=400.0)
    # one prefill GPU (mu 10) keeps 90% within 400 ms up to lam ~4.78: 2P2D 9.57, 3P1D 14.35 (decode 17.8)
    slo = {s.label: s.slo_rate for s in advice.splits}
    lam = slo["1P3D"]
    assert within_ttft(lam, 10.0, 0.4) == pytest.approx(0.9, abs=1e-6) and lam == pytest.approx(4.783, abs=1e-3)
    assert slo == pytest.approx({"1P3D": lam, "2P2D": 2 * lam, "3P1D": 3 * lam})
    best = advice.best
    assert best.label == "3P1D" and best.sustained_rate == pytest.approx(160.0 / 9)
    assert best.within(best.slo_rate) == pytest.approx(0.9, abs=1e-6)
    assert best.goodput(12.0) == pytest.approx(within_ttft(4.0, 10.0, 0.4) * 12.0)
    assert best.goodput(30.0) == 0.0  # past the prefill GPUs' 30 req/s
    assert "to keep 90% of requests within TTFT 400 ms up to 14.35 req/s and to sustain 17.78 req/s" \
        in advice.sentence()
    # long outputs: without the target 1P3D (8 req/s, decode-bound), with it 2P2D (its one prefill keeps up)
    assert advise(4, 3000, 2000, 15.0, 30000.0, points, 256).best.label == "1P3D"
    assert advise(4, 3000, 2000, 15.0, 30000.0, points, 256, ttft_target_ms=400.0).best.label == "2P2D"


def _metrics_page(values: dict[str, tuple[float, float, float]]) -> str:
    """A /metrics page with the engine step counters: kind -> (steps, seconds, tokens)."""
    registry = CollectorRegistry()
    steps = Counter("pdlaunch_engine_steps", "", ["kind"], registry=registry)
    seconds = Counter("pdlaunch_engine_step_seconds", "", ["kind"], registry=registry)
    tokens = Counter("pdlaunch_engine_step_tokens", "", ["kind"], registry=registry)
    for kind, (n, s, t) in values.items():
        steps.labels(kind=kind).inc(n)
        seconds.labels(kind=kind).inc(s)
        tokens.labels(kind=kind).inc(t)
    return generate_latest(registry).decode()


def test_step_counters_are_read_from_a_metrics_page() -> None:
    totals = parse_step_totals(_metrics_page({"prefill": (4, 2.0, 8192), "decode": (10, 0.5, 300)}))
    assert totals == {"prefill": StepTotals(steps=4, seconds=2.0, tokens=8192),
                      "decode": StepTotals(steps=10, seconds=0.5, tokens=300)}
    assert parse_step_totals("") == {"prefill": StepTotals(), "decode": StepTotals()}


def _instance(role: str, prefill: tuple[float, float, float], decode: tuple[float, float, float]) -> InstanceTotals:
    return InstanceTotals(role=role, by_kind={"prefill": StepTotals(steps=prefill[0], seconds=prefill[1],
                                                                     tokens=prefill[2]),
                                               "decode": StepTotals(steps=decode[0], seconds=decode[1],
                                                                    tokens=decode[2])})


def test_engine_load_of_pd_and_colocated_deployments() -> None:
    zero = (0.0, 0.0, 0.0)
    before = [_instance("prefill", zero, zero), _instance("decode", zero, zero)]
    after = [_instance("prefill", (10, 6.0, 30000), (1, 0.5, 1)), _instance("decode", (0, 0, 0), (200, 2.0, 6400))]
    pd = engine_load(before, after, wall_s=10.0)
    assert pd.prefill_util == pytest.approx(0.65) and pd.decode_util == pytest.approx(0.2)
    assert pd.prefill_tokens_per_s == pytest.approx(5000.0)
    assert pd.decode_batch == pytest.approx(32.0) and pd.decode_step_ms == pytest.approx(10.0)

    colocated = [_instance("colocated", zero, zero)] * 2
    later = [_instance("colocated", (5, 3.0, 10000), (100, 1.0, 800))] * 2
    load = engine_load(colocated, later, wall_s=10.0)
    assert load.prefill_util == pytest.approx(0.3) and load.decode_util == pytest.approx(0.1)
    assert load.prefill_tokens_per_s == pytest.approx(20000 / 6.0) and load.decode_batch == pytest.approx(8.0)
    idle = engine_load(colocated, colocated, wall_s=1.0)
    assert (idle.prefill_util, idle.prefill_tokens_per_s, idle.decode_step_ms) == (0.0, None, None)


def test_long_token_gaps_are_read_from_the_itl_histogram_of_the_instances_that_stream() -> None:
    registry = CollectorRegistry()
    itl = Histogram("pdlaunch_inter_token_latency_seconds", "", registry=registry,
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
    for gap in (0.008, 0.008, 0.05, 0.051, 0.3, 2.0):
        itl.observe(gap)
    Counter("pdlaunch_engine_slow_decode_steps", "", registry=registry).inc(2)
    page = generate_latest(registry).decode()
    assert parse_long_gaps(page) == 3.0  # 51 ms, 300 ms, 2 s: the 50 ms bucket holds 50 ms itself
    assert parse_long_gaps("") == 0.0
    zero = (0.0, 0.0, 0.0)
    before = [_instance("prefill", zero, zero), _instance("decode", zero, zero)]
    after = [parse_instance("prefill", page), parse_instance("decode", page)]
    load = engine_load(before, after, wall_s=1.0)
    assert load.long_token_gaps == 3.0 and load.slow_decode_steps == 2.0  # the decode's, not the prefill's
    coarse = CollectorRegistry()
    Histogram("pdlaunch_inter_token_latency_seconds", "", registry=coarse, buckets=(0.01, 1)).observe(0.2)
    with pytest.raises(ValueError, match="0.05 s bucket"):
        parse_long_gaps(generate_latest(coarse).decode())


def test_a_replay_sends_each_prompt_to_the_prefill_that_frees_first() -> None:
    # 1000 tokens/s: a 500-token prompt takes 0.5 s
    assert prefill_times([0.0, 0.1, 0.2], [500, 500, 100], 1, 1000.0) == pytest.approx([0.5, 0.9, 0.9])
    assert prefill_times([0.0, 0.1, 0.2], [500, 500, 100], 2, 1000.0) == pytest.approx([0.5, 0.5, 0.4])
    assert prefill_times([0.2, 0.0], [100, 500], 1, 1000.0) == pytest.approx([0.4, 0.5])  # arrival order, not list
    with pytest.raises(ValueError, match="replay"):
        prefill_times([0.0], [1, 2], 1, 1000.0)


def test_the_per_rate_prediction_replays_the_pd_runs_workload() -> None:
    points = [DecodePoint(batch=16, step_ms=7.0), DecodePoint(batch=64, step_ms=13.0)]
    advice = advise(2, 300, 11, 15.0, 1000.0, points, 64, ttft_target_ms=400.0)  # 1P1D; 3.3 prompts/s a GPU
    arrivals, lens = [0.0, 0.1, 0.2, 0.3], [300, 300, 300, 300]
    # the PD run measured each TTFT 50 ms over its replayed prefill time: the overhead
    replayed = prefill_times(arrivals, lens, 1, 1000.0)
    w = workload(4.0, arrivals, lens, [t + 0.05 for t in replayed], 1, 1000.0, decode_step_ms=10.0)
    assert w.ttft_overhead_s == pytest.approx(0.05)
    advice.workloads = [w]
    # TTFTs 0.35, 0.55, 0.75, 0.95 s: one within 400 ms; the run ends at 0.3 + 0.95 + 10 steps of 10 ms = 1.35 s
    assert advice.predicted_goodput(4.0) == pytest.approx(1 / 1.35)
    assert advice.predicted_goodput(2.0) == advice.best.goodput(2.0)  # a rate the PD run did not measure
    assert advice.best.goodput(4.0) != pytest.approx(1 / 1.35)


def test_when_no_split_meets_the_ttft_target_the_advice_says_so_and_ranks_by_sustained_rate() -> None:
    """Review 76F: every SLO rate is 0 when one prompt's prefill (3072 / 7000 tokens/s = 439 ms) is over the TTFT
    target; the tie went to the most prefill GPUs (3P1D), which sustains the least of this decode-bound workload."""
    # decode: t(b) = 13 + 1 * b ms -> 2 sequences within TPOT 15 ms, ~1.04 req/s per decode GPU: decode-bound
    advice = advise(4, 3072, 128, 15.0, 7000.0, [DecodePoint(batch=1, step_ms=14.0),
                                                 DecodePoint(batch=3, step_ms=16.0)], 64, ttft_target_ms=400.0)
    assert all(s.slo_rate == 0.0 for s in advice.splits)
    sustained = {s.label: s.sustained_rate for s in advice.splits}
    assert advice.best.label == "1P3D" and advice.best.sustained_rate == max(sustained.values()), sustained
    assert advice.unmet == ("one 3072-token prompt's prefill takes 439 ms at 7000 tokens/s, 39 ms over the TTFT "
                            "target of 400 ms")
    sentence = advice.sentence()
    assert sentence.startswith(f"advice for 4 GPUs: no split meets the SLOs: {advice.unmet}; splits by the rate "
                               "they sustain within TPOT 15 ms, for information: 1P3D 2.28, 2P2D 2.08, 3P1D 1.04 "
                               "req/s"), sentence


def test_with_no_decode_capacity_no_split_is_advised() -> None:
    # a decode step of 20 ms at batch 1 misses TPOT 15 ms: no split serves a request within the SLOs
    advice = advise(4, 3072, 128, 15.0, 20000.0, [DecodePoint(batch=1, step_ms=20.0),
                                                  DecodePoint(batch=8, step_ms=30.0)], 64, ttft_target_ms=400.0)
    assert advice.decode_sequences == 0.0
    assert advice.unmet == "a batch-1 decode step takes 20 ms, 5 ms over the TPOT target of 15 ms"
    assert advice.sentence().startswith(
        f"advice for 4 GPUs: no split meets the SLOs: {advice.unmet}; every split sustains 0 req/s within TPOT "
        "15 ms"), advice.sentence()
    # both targets missed: both named
    both = advise(2, 3072, 128, 15.0, 1000.0, [DecodePoint(batch=1, step_ms=20.0)], 64, ttft_target_ms=400.0)
    assert both.unmet == ("a batch-1 decode step takes 20 ms, 5 ms over the TPOT target of 15 ms, and one "
                          "3072-token prompt's prefill takes 3072 ms at 1000 tokens/s, 2672 ms over the TTFT target "
                          "of 400 ms")
    # without a TTFT target, only the TPOT one can be missed
    assert advise(2, 100, 10, 1.0, 1000.0, [DecodePoint(batch=16, step_ms=7.0)], 64).unmet == (
        "a batch-1 decode step takes 7 ms, 6 ms over the TPOT target of 1 ms")


def test_a_split_that_meets_the_slos_leaves_nothing_unmet() -> None:
    points = [DecodePoint(batch=8, step_ms=6.0), DecodePoint(batch=40, step_ms=10.0)]
    assert advise(4, 3000, 100, 15.0, 30000.0, points, 256).unmet is None
    assert advise(4, 3000, 100, 15.0, 30000.0, points, 256, ttft_target_ms=400.0).unmet is None
