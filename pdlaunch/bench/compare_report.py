"""What `pdlaunch bench compare` reports: the tables per rate (compare_tables.py), the P:D advisor's split with its
predicted against measured goodput (compare_advice.py), the highest rate PD sustains within the SLOs, with a
conditional deployment (--disaggregate-min-tokens) its goodput against the better of always-PD and colocated
(compare_conditional.py); a JSON of every raw figure and a goodput-against-rate PNG (matplotlib is optional)."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from pydantic import JsonValue
from rich.console import Console

from pdlaunch.bench.advisor import Advice
from pdlaunch.bench.compare import write_json_whole, write_whole
from pdlaunch.bench.compare_advice import advice_document, advice_table
from pdlaunch.bench.compare_conditional import capacity_text, conditional_against_best, conditional_capacity
from pdlaunch.bench.compare_config import CompareConfig
from pdlaunch.bench.compare_tables import comparison_table, load_table, prefill_compute_table, prompts_text
from pdlaunch.bench.goodput import WITHIN_SLO_SHARE, highest_rate_within
from pdlaunch.bench.matmul_ceiling import Yardstick
from pdlaunch.bench.plots import require_matplotlib
from pdlaunch.bench.rate_sweep import DeploymentRun
from pdlaunch.errors import PdlaunchError

JSON_NAME = "compare.json"
PLOT_NAME = "goodput.png"


def verdict(run: DeploymentRun) -> tuple[float | None, str]:
    """The highest rate `run` keeps >= 90% of requests within the SLOs at, and the sentence that says so."""
    best = highest_rate_within(run.points)
    share = f"{100 * WITHIN_SLO_SHARE:.0f}%"
    if best is None:
        lowest = min(p.rate for p in run.points)
        return None, f"{run.description} keeps < {share} of requests within the SLOs already at {lowest:g} req/s"
    tail = " (the highest rate measured: try higher rates)" if best == max(p.rate for p in run.points) else ""
    return best, f"{run.description} keeps >= {share} of requests within the SLOs up to {best:g} req/s{tail}"


def compare_document(cfg: CompareConfig, runs: list[DeploymentRun], advice: Advice | None = None,
                     yardstick: Yardstick | None = None) -> dict[str, JsonValue]:
    pd = next(run for run in runs if run.kind == "pd")
    best, sentence = verdict(pd)
    capacity = conditional_capacity(runs)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "settings": cfg.model_dump(mode="json"),
        "prefill_yardstick": yardstick.model_dump(mode="json") if yardstick is not None else None,
        "within_slo_share": WITHIN_SLO_SHARE,
        "pd_highest_rate_within_slo": best,
        "verdict": sentence,
        "advisor": advice_document(advice, runs, cfg) if advice is not None else None,
        "conditional_against_best": [*conditional_against_best(runs, cfg)],
        "conditional_capacity": None if capacity is None else {name: row.model_dump()
                                                                for name, row in capacity.items()},
        "deployments": [
            {"kind": run.kind, "label": run.label, "description": run.description, "prefill": run.prefill,
             "decode": run.decode, "steps": {role: limits.model_dump() for role, limits in run.steps.items()},
             "pids": [*run.pids],
             "stopped": run.stopped,
             "points": [{**p.model_dump(), "within_share": p.within_share, "tight_within_share": p.tight_within_share}
                        for p in run.points],
             "highest_rate_within_slo": highest_rate_within(run.points),
             "highest_rate_within_tight_slo": highest_rate_within(run.points, tight=True), "raw": [*run.raw]}
            for run in runs
        ],
    }


def write_goodput_plot(cfg: CompareConfig, runs: list[DeploymentRun], path: Path,
                       advice: Advice | None = None) -> Path:
    """The goodput-against-rate PNG at `path`, whole or not at all (PdlaunchError when it cannot be written)."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for run in runs:
            ax.plot([p.rate for p in run.points], [p.goodput for p in run.points], marker="o", label=run.description)
        if advice is not None and advice.unmet is None:
            ax.plot(cfg.rates, [advice.predicted_goodput(r) for r in cfg.rates], linestyle="--", color="black",
                    label=f"advisor: {advice.best.label} predicted ({cfg.advise_for} SLOs)")
        ax.plot(cfg.rates, cfg.rates, linestyle=":", color="grey", label="offered rate")
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_ylabel("goodput (requests/s within SLOs)")
        ax.set_title(f"TTFT <= {cfg.ttft_slo_ms:g} ms, TPOT <= {cfg.tpot_slo_ms:g} ms; "
                     f"{prompts_text(cfg)}, {cfg.output_len} out")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        write_whole(path, lambda file: fig.savefig(file, format="png", dpi=110),
                    hint="compare.json has every figure; free space, or give an --out you can write")
    finally:  # a figure left open stays in pyplot's registry for the life of the process
        plt.close(fig)
    return path


def report_comparison(console: Console, cfg: CompareConfig, runs: list[DeploymentRun],
                      advice: Advice | None = None, yardstick: Yardstick | None = None,
                      written: list[Path] | None = None) -> dict[str, JsonValue]:
    """Print the tables and the verdict, then write the JSON and (with matplotlib) the plot into `cfg.out`, each
    whole or not at all, adding its path to `written` once it is there. A file that cannot be written is a
    PdlaunchError naming --out, raised once every figure is on screen."""
    written = [] if written is None else written
    console.print(comparison_table(runs, cfg))
    console.print(load_table(runs, cfg))
    if yardstick is not None:
        console.print(prefill_compute_table(runs, cfg, yardstick))
    doc = compare_document(cfg, runs, advice, yardstick)
    if advice is not None:
        console.print(advice_table(advice, runs, cfg))
    for run in runs:
        if run.kind != "pd":
            console.print(verdict(run)[1], highlight=False)
    for row in conditional_against_best(runs, cfg):
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}x, "
        console.print(f"rate {row['rate']:g}/s: per-request disaggregation {row['goodput']:.3f}/s against "
                      f"{row['best_other_goodput']:.3f}/s of {row['best_other']} "
                      f"({ratio}{'at least as good' if row['at_least_best'] else 'below it'}); tight SLOs "
                      f"{row['tight_goodput']:.3f}/s against {row['best_other_tight_goodput']:.3f}/s"
                      + ("" if row["kv_bytes"] is None or row["pd_kv_bytes"] is None else
                         f"; KV moved {row['kv_bytes']:,.0f} B against PD's {row['pd_kv_bytes']:,.0f} B"),
                      highlight=False)
    capacity = conditional_capacity(runs)
    if capacity is not None:
        console.print(capacity_text(capacity), highlight=False)
    console.print(f"[bold]{doc['verdict']}[/bold]", highlight=False)
    json_path = cfg.out / JSON_NAME
    write_json_whole(doc, json_path, hint="the figures are printed above, and each deployment's are in its "
                     "OUT/<kind>.json; free space, or give an --out you can write")
    written.append(json_path)
    console.print(f"Wrote {json_path}", highlight=False, markup=False)
    try:
        require_matplotlib()
    except PdlaunchError:
        console.print("no plot: matplotlib is not installed (pip install 'pdlaunch[bench]')", highlight=False,
                      markup=False)
        return doc
    written.append(write_goodput_plot(cfg, runs, cfg.out / PLOT_NAME, advice))
    console.print(f"Wrote {written[-1]}", highlight=False, markup=False)
    return doc
