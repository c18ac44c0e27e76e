"""The conditional deployment (`pdlaunch bench compare --disaggregate-min-tokens`: per-request disaggregation)
against the better of always-PD and colocated: its goodput and KV bytes per rate, and the highest rate it keeps
within the SLOs."""

from __future__ import annotations

from pydantic import BaseModel, JsonValue

from pdlaunch.bench.compare_config import CompareConfig
from pdlaunch.bench.goodput import WITHIN_SLO_SHARE, highest_rate_within
from pdlaunch.bench.rate_sweep import DeploymentRun


def _kv_bytes(run: DeploymentRun | None, i: int) -> float | None:
    load = run.points[i].load if run is not None and i < len(run.points) else None
    return load.kv_bytes if load is not None else None


def conditional_against_best(runs: list[DeploymentRun], cfg: CompareConfig) -> list[dict[str, JsonValue]]:
    """Per rate, the conditional deployment's goodput (both SLO sets) against the better of always-PD and
    colocated at that rate; empty without a conditional run."""
    conditional = next((r for r in runs if r.kind == "conditional"), None)
    others = [r for r in runs if r.kind in ("pd", "colocated")]
    pd = next((r for r in runs if r.kind == "pd"), None)
    if conditional is None:
        return []
    rows: list[dict[str, JsonValue]] = []
    for i, rate in enumerate(cfg.rates):
        if i >= len(conditional.points) or any(i >= len(r.points) for r in others):
            continue
        mine = conditional.points[i]
        best = max(others, key=lambda r: r.points[i].goodput)
        best_tight = max(others, key=lambda r: r.points[i].tight_goodput)
        rows.append({"rate": rate, "goodput": mine.goodput, "best_other": best.label,
                     "best_other_goodput": best.points[i].goodput,
                     "ratio": mine.goodput / best.points[i].goodput if best.points[i].goodput else None,
                     "at_least_best": mine.goodput >= best.points[i].goodput,
                     "tight_goodput": mine.tight_goodput, "best_other_tight": best_tight.label,
                     "best_other_tight_goodput": best_tight.points[i].tight_goodput,
                     "tight_at_least_best": mine.tight_goodput >= best_tight.points[i].tight_goodput,
                     # KV bytes moved over the rate (warm-ups included): per-request disaggregation against PD
                     "kv_bytes": _kv_bytes(conditional, i),
                     "pd_kv_bytes": _kv_bytes(pd, i)})
    return rows


def _or_below(rate: float | None) -> float:
    """A highest rate for ordering: None (already missed at the lowest rate measured) below every rate."""
    return -1.0 if rate is None else rate


class CapacityRow(BaseModel):
    """One SLO set's highest rates (`conditional_capacity`)."""

    conditional: float | None
    best_other: str
    best_other_rate: float | None
    at_least_best: bool | None  # None: no deployment keeps the share at the lowest rate (nothing to compare)


def conditional_capacity(runs: list[DeploymentRun]) -> dict[str, CapacityRow] | None:
    """Per SLO set ("relaxed", "tight"), the highest rate the conditional deployment keeps >= WITHIN_SLO_SHARE
    of requests within (`highest_rate_within`: goodput as DistServe defines it, at the resolution of the rates
    measured) against the better of always-PD and colocated; None without a conditional run."""
    conditional = next((r for r in runs if r.kind == "conditional"), None)
    others = [r for r in runs if r.kind in ("pd", "colocated")]
    if conditional is None or not others:
        return None
    rows: dict[str, CapacityRow] = {}
    for name, tight in (("relaxed", False), ("tight", True)):
        mine = highest_rate_within(conditional.points, tight=tight)
        rates = {r.label: highest_rate_within(r.points, tight=tight) for r in others}
        best = max(rates, key=lambda label: _or_below(rates[label]))
        theirs = rates[best]
        rows[name] = CapacityRow(conditional=mine, best_other=best, best_other_rate=theirs,
                                 at_least_best=None if mine is None and theirs is None
                                 else _or_below(mine) >= _or_below(theirs))
    return rows


def capacity_text(capacity: dict[str, CapacityRow]) -> str:
    def rate(value: float | None) -> str:
        return "none" if value is None else f"{value:g} req/s"

    verdicts = {None: "neither keeps it at the lowest rate", True: "at least as good", False: "below it"}
    parts = [f"{name}: per-request disaggregation {rate(row.conditional)} against {rate(row.best_other_rate)} of "
             f"{row.best_other} ({verdicts[row.at_least_best]})" for name, row in capacity.items()]
    return (f"highest rate keeping >= {100 * WITHIN_SLO_SHARE:.0f}% of requests within the SLOs, of the rates "
            "measured: " + "; ".join(parts))
