"""The P:D advisor's split in `pdlaunch bench compare`'s report: its goodput predicted per rate against the goodput
measured on the run of that split, as a table and in compare.json; when no split meets the SLOs, why none ran."""

from __future__ import annotations

from pydantic import JsonValue
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from pdlaunch.bench.advisor import Advice
from pdlaunch.bench.compare_config import CompareConfig
from pdlaunch.bench.rate_sweep import DeploymentRun


def advised_run(runs: list[DeploymentRun], advice: Advice) -> DeploymentRun | None:
    """The run of the advised split: the advised deployment, or the PD run when it already was that split; None
    when no split meets the SLOs (none is advised)."""
    if advice.unmet is not None:
        return None
    split = (advice.best.prefill, advice.best.decode)
    return next((r for r in runs if r.kind == "advised"), None) or \
        next((r for r in runs if r.kind == "pd" and (r.prefill, r.decode) == split), None)


def skipped_because(advice: Advice, runs: list[DeploymentRun], cfg: CompareConfig) -> str | None:
    """Why the advised split has no run (None when it has one): no split meets the SLOs, --no-run-advised, or
    --baseline (whose comparison runs no other split)."""
    if advice.unmet is not None:
        return f"no split meets the {cfg.advise_for} SLOs: {advice.unmet}"
    if advised_run(runs, advice) is not None:
        return None
    if cfg.baseline is not None:
        return "--baseline: only the baseline's colocated and PD runs and per-request disaggregation are run"
    return "--no-run-advised" if not cfg.run_advised else "the comparison ended before it ran"


def _per_rate(advice: Advice, run: DeploymentRun | None, cfg: CompareConfig) -> list[tuple[float, float, float | None]]:
    """(rate, predicted goodput, goodput measured on the advised split's run or None) per offered rate."""
    def measured(i: int) -> float | None:
        if run is None or i >= len(run.points):
            return None
        return run.points[i].goodput if cfg.advise_for == "relaxed" else run.points[i].tight_goodput

    return [(rate, advice.predicted_goodput(rate), measured(i)) for i, rate in enumerate(cfg.rates)]


def advice_document(advice: Advice, runs: list[DeploymentRun], cfg: CompareConfig) -> dict[str, JsonValue]:
    run = advised_run(runs, advice)
    return {
        **advice.model_dump(mode="json"), "split": advice.best.label if advice.unmet is None else None,
        "slo_set": cfg.advise_for, "sentence": advice.sentence(), "measured_by": run.label if run is not None else None,
        "advised_run_skipped": skipped_because(advice, runs, cfg),
        "prompt_tokens_while_decoding": advice.prompt_token_cap(),
        "per_rate": [{"rate": rate, "predicted_goodput": predicted, "measured_goodput": measured}
                     for rate, predicted, measured in _per_rate(advice, run, cfg)],
    }


def advice_table(advice: Advice, runs: list[DeploymentRun], cfg: CompareConfig) -> Group:
    """The advisor's sentence, its per-rate table and the note on prompt_tokens_while_decoding. The sentence and the
    note are paragraphs of their own: as the table's title and caption, rich wrapped them to its three columns, a
    dozen centred lines of 40 characters."""
    if advice.unmet is not None:  # no split advised: nothing predicted to set against a run
        return Group(Text(f"P:D advisor: {advice.sentence()}"),
                     Text(f"advised split not run: {skipped_because(advice, runs, cfg)}"))
    run = advised_run(runs, advice)
    table = Table(box=box.SIMPLE_HEAD)
    decode = run.steps.get("decode") if run is not None else None
    now = f", now {decode.prompt_tokens_while_decoding}" if decode is not None else ""
    # the mean batch the cap is taken at, as measured: a CPU run's 1.6 said as 2 named a batch whose longer step
    # leaves fewer prompt tokens than the cap
    batch = f"{advice.cap_batch:.1f}".removesuffix(".0")
    note = (f"goodput under the {cfg.advise_for} SLOs, measured on "
            f"{run.label if run is not None else 'no run'}; where prompts run beside decodes (colocated, "
            f"or spilled to a decode), at most {advice.prompt_token_cap()} prompt tokens a step keep "
            f"{batch} streams within TPOT {advice.tpot_target_ms:g} ms by the prefill's rate "
            f"alone, not counting a step's host work: measure it before lowering "
            f"scheduler.prompt_tokens_while_decoding{now}")
    for col in ("rate /s", "predicted /s", "measured /s"):
        table.add_column(col, justify="right", no_wrap=True)
    for rate, predicted, measured in _per_rate(advice, run, cfg):
        table.add_row(f"{rate:g}", f"{predicted:.2f}", "-" if measured is None else f"{measured:.2f}")
    return Group(Text(f"P:D advisor: {advice.sentence()}"), table, Text(note))
