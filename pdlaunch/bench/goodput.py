"""Goodput arithmetic of `pdlaunch bench compare`: which requests meet the SLOs, one figure row per rate,
and the highest rate a deployment sustains.

Two SLO sets (issue 29): relaxed (TTFT <= 400 ms, TPOT <= 15 ms; `--ttft-slo-ms`, `--tpot-slo-ms`) and tight
(TTFT <= 1 s, TPOT <= 10 ms; `--tight-ttft-slo-ms`, `--tight-tpot-slo-ms`).

A request is within the SLOs when it completed, its TTFT <= ttft_slo_ms and its TPOT <= tpot_slo_ms,
TPOT as in report.py: (E2EL - TTFT) / (output_len - 1), counted 0 for output_len <= 1. A failed
request is never within. Goodput = requests within / benchmark duration (s), as `bench serve` reports.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, JsonValue

from pdlaunch.bench.engine_load import LONG_GAP_S, EngineLoad
from pdlaunch.bench.flag_numbers import shown
from pdlaunch.bench.matmul_ceiling import PrefillShare
from pdlaunch.bench.report import MS_PER_S, ServeDoc

WITHIN_SLO_SHARE = 0.9  # "PD keeps >= 90% of requests within the SLOs" (issue 15)


class Slo(BaseModel):
    ttft_ms: float = Field(gt=0)
    tpot_ms: float = Field(gt=0)

    def as_goodput_specs(self) -> list[str]:
        """The same SLOs as `bench serve --goodput` takes them, every digit kept (`:g` made 12.3456789 12.3457)."""
        return [f"ttft:{shown(self.ttft_ms)}", f"tpot:{shown(self.tpot_ms)}"]


def request_tpot_s(ttft_s: float, e2el_s: float, output_len: int) -> float:
    return (e2el_s - ttft_s) / (output_len - 1) if output_len > 1 else 0.0


def meets_slo(slo: Slo, ok: bool, ttft_s: float, e2el_s: float, output_len: int) -> bool:
    if not ok:
        return False
    tpot_s = request_tpot_s(ttft_s, e2el_s, output_len)
    return ttft_s * MS_PER_S <= slo.ttft_ms and tpot_s * MS_PER_S <= slo.tpot_ms


def _number(value: JsonValue, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"bench serve result: {key} holds {value!r}, not a number")
    return float(value)


def _column(doc: ServeDoc, key: str) -> list[JsonValue]:
    values = doc[key]
    if not isinstance(values, list):
        raise ValueError(f"bench serve result: {key} is not a per-request list")
    return values


def count_within(doc: ServeDoc, slo: Slo) -> int:
    """Requests of one `bench serve` result document (per-request lists) that meet both SLOs."""
    columns = (_column(doc, key) for key in ("errors", "ttfts", "e2els", "output_lens"))
    return sum(
        meets_slo(slo, not err, _number(ttft, "ttfts"), _number(e2el, "e2els"), int(_number(out, "output_lens")))
        for err, ttft, e2el, out in zip(*columns)
    )


class RatePoint(BaseModel):
    """One deployment at one offered rate. Latencies in ms, rates in requests/s."""

    rate: float
    num_prompts: int
    completed: int
    within_slo: int
    duration_s: float
    goodput: float
    served: float  # completed requests per second
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    # the tight SLO set (the fields above without a prefix are the relaxed set's)
    tight_within_slo: int = 0
    tight_goodput: float = 0.0
    itl_p99_ms: float = 0.0
    long_itl_gaps: int = 0  # gaps >= engine_load.LONG_GAP_S between the tokens the client received
    load: EngineLoad | None = None  # what the engines did (engine_load.py); None when not read
    prefill_compute: PrefillShare | None = None  # the prefill steps' FLOP rate (matmul_ceiling.py)

    @property
    def within_share(self) -> float:
        return self.within_slo / self.num_prompts if self.num_prompts else 0.0

    @property
    def tight_within_share(self) -> float:
        return self.tight_within_slo / self.num_prompts if self.num_prompts else 0.0


def rate_point(rate: float, doc: ServeDoc, slo: Slo, tight: Slo | None = None,
               load: EngineLoad | None = None) -> RatePoint:
    """The comparison row of one `bench serve` result document."""
    within = count_within(doc, slo)
    tight_within = count_within(doc, tight) if tight is not None else 0
    def number(key: str) -> float:
        return _number(doc[key], key)

    duration = number("duration")
    return RatePoint(
        rate=rate, num_prompts=len(_column(doc, "errors")), completed=int(number("completed")), within_slo=within,
        duration_s=duration, goodput=within / duration if duration > 0 else 0.0,
        served=number("request_throughput"),
        ttft_p50_ms=number("median_ttft_ms"), ttft_p99_ms=number("p99_ttft_ms"),
        tpot_p50_ms=number("median_tpot_ms"), tpot_p99_ms=number("p99_tpot_ms"),
        tight_within_slo=tight_within, tight_goodput=tight_within / duration if duration > 0 else 0.0,
        itl_p99_ms=number("p99_itl_ms"), long_itl_gaps=count_long_gaps(doc), load=load,
    )


def count_long_gaps(doc: ServeDoc) -> int:
    """Gaps of LONG_GAP_S or more between the tokens of each request in one `bench serve` result document (0 for a
    document without per-request `itls`)."""
    if "itls" not in doc:
        return 0
    gaps = 0
    for itls in _column(doc, "itls"):
        if not isinstance(itls, list):
            raise ValueError("bench serve result: itls holds a request's gaps that are not a list")
        gaps += sum(1 for gap in itls if _number(gap, "itls") >= LONG_GAP_S)
    return gaps


def highest_rate_within(points: list[RatePoint], share: float = WITHIN_SLO_SHARE,
                        tight: bool = False) -> float | None:
    """The highest rate up to which the deployment *keeps* >= `share` of requests within the SLOs (the
    tight set's with `tight`): every measured rate up to and including it qualifies. A pass above a failed
    lower rate is noise, not capacity, so it does not count. None when the lowest measured rate already
    misses."""
    best: float | None = None
    for point in sorted(points, key=lambda p: p.rate):
        if (point.tight_within_share if tight else point.within_share) < share:
            break
        best = point.rate
    return best
