"""bench serve metric definitions (vLLM's) on synthetic timings with hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from pdlaunch.bench.report import RequestResult, calculate_metrics, parse_goodput, result_dict
from pdlaunch.errors import PdlaunchError


def _results() -> list[RequestResult]:
    return [
        # TPOT = (0.5 - 0.1) / (5 - 1) = 0.1 s
        RequestResult(success=True, prompt_len=10, output_len=5, ttft=0.1, latency=0.5, itl=[0.1, 0.1, 0.1, 0.1]),
        # one output token: no TPOT sample, but TPOT 0 for goodput
        RequestResult(success=True, prompt_len=20, output_len=1, ttft=0.2, latency=0.2, itl=[]),
        # TPOT = (0.7 - 0.3) / 2 = 0.2 s
        RequestResult(success=True, prompt_len=10, output_len=3, ttft=0.3, latency=0.7, itl=[0.2, 0.2]),
        RequestResult(success=False, prompt_len=99, output_len=0, error="HTTP 500: boom"),
    ]


def test_counts_and_throughputs() -> None:
    m = calculate_metrics(_results(), duration=2.0, goodput_ms={})
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (40, 9)  # failed request's prompt not counted
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(4.5)
    assert m.total_token_throughput == pytest.approx(24.5)
    assert m.request_goodput is None


def test_latency_statistics_in_ms() -> None:
    lat = calculate_metrics(_results(), duration=2.0, goodput_ms={}).latency_ms
    # TTFT [100, 200, 300]: linear percentiles, p90 at rank 1.8, p99 at rank 1.98
    assert lat["ttft"].mean == pytest.approx(200.0)
    assert lat["ttft"].median == pytest.approx(200.0)
    assert lat["ttft"].p90 == pytest.approx(280.0)
    assert lat["ttft"].p99 == pytest.approx(298.0)
    # TPOT only from requests with more than one output token: [100, 200]
    assert lat["tpot"].mean == pytest.approx(150.0)
    assert lat["tpot"].p90 == pytest.approx(190.0)
    # ITL pooled over requests: four gaps of 100 ms, two of 200 ms
    assert lat["itl"].mean == pytest.approx(800.0 / 6)
    assert lat["itl"].median == pytest.approx(100.0)
    assert lat["itl"].p99 == pytest.approx(200.0)
    # E2EL [500, 200, 700]
    assert lat["e2el"].mean == pytest.approx(1400.0 / 3)
    assert lat["e2el"].median == pytest.approx(500.0)
    assert lat["e2el"].std == pytest.approx(math.sqrt((100**2 + 800**2 + 700**2) / 27))  # population std


def test_goodput_counts_requests_meeting_every_slo() -> None:
    # ttft <= 250 ms and tpot <= 150 ms: requests 1 (100/100) and 2 (200/0) pass, 3 (300 ms TTFT) fails
    m = calculate_metrics(_results(), duration=2.0, goodput_ms={"ttft": 250.0, "tpot": 150.0})
    assert m.request_goodput == pytest.approx(1.0)
    # e2el <= 500 ms: requests 1 (500) and 2 (200); an SLO met exactly counts as met
    m = calculate_metrics(_results(), duration=2.0, goodput_ms={"e2el": 500.0})
    assert m.request_goodput == pytest.approx(1.0)
    m = calculate_metrics(_results(), duration=2.0, goodput_ms={"tpot": 50.0})
    assert m.request_goodput == pytest.approx(0.5)  # only the one-token request


def test_no_completed_request_reports_zeros() -> None:
    m = calculate_metrics([RequestResult(error="refused")], duration=1.0, goodput_ms={"ttft": 10.0})
    assert (m.completed, m.failed, m.request_goodput) == (0, 1, 0.0)
    assert m.latency_ms["ttft"].p99 == 0.0


def test_json_fields_use_vllm_names() -> None:
    results = _results()
    m = calculate_metrics(results, duration=2.0, goodput_ms={"ttft": 250.0})
    doc = result_dict(m, results, {"model_id": "x"})
    for key in ("completed", "failed", "duration", "request_throughput", "request_goodput", "output_throughput",
                "total_token_throughput", "total_input_tokens", "total_output_tokens"):
        assert key in doc
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p90", "p99"):
            assert f"{stat}_{name}_ms" in doc
    assert doc["p99_ttft_ms"] == pytest.approx(298.0)
    assert doc["output_lens"] == [5, 1, 3, 0]
    assert doc["errors"] == ["", "", "", "HTTP 500: boom"]
    assert "request_goodput" not in result_dict(calculate_metrics(results, 2.0, {}), results, {})


@pytest.mark.parametrize("spec", ["ttft", "ttfb:100", "tpot:fast", "e2el:-5"])
def test_bad_goodput_spec_names_the_flag(spec: str) -> None:
    with pytest.raises(PdlaunchError) as info:
        parse_goodput([spec])
    assert info.value.field == "--goodput"


def test_goodput_spec_parses() -> None:
    assert parse_goodput(["TTFT:200", "tpot:50.5", "e2el:1000"]) == {"ttft": 200.0, "tpot": 50.5, "e2el": 1000.0}
