"""What `pdlaunch bench compare` reports: a side-by-side table per rate (latencies; goodput under both SLO sets,
ITL p99, prefill and decode utilisation; the prefill steps' FLOP rate and its share of the matmul ceiling), the
P:D advisor's split with its predicted against measured goodput,
a JSON of every raw figure, a goodput-against-rate PNG (matplotlib is optional) and the highest rate PD sustains
within the SLOs; with a conditional deployment (--disaggregate-min-tokens), its goodput per rate against the better
of always-PD and colocated."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from pydantic import BaseModel, JsonValue
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pdlaunch.bench.advisor import Advice
from pdlaunch.bench.compare import write_json_whole, write_whole
from pdlaunch.bench.compare_config import CompareConfig
from pdlaunch.bench.goodput import WITHIN_SLO_SHARE, RatePoint, highest_rate_within
from pdlaunch.bench.matmul_ceiling import Yardstick
from pdlaunch.bench.plots import require_matplotlib
from pdlaunch.bench.rate_sweep import DeploymentRun
from pdlaunch.errors import PdlaunchError

JSON_NAME = "compare.json"
PLOT_NAME = "goodput.png"


def prompts_text(cfg: CompareConfig) -> str:
    """`3072-token prompts`, or for a mix `64/3072-token prompts (equal shares)`."""
    if cfg.input_lens is None:
        return f"{cfg.input_len}-token prompts"
    return f"{'/'.join(map(str, cfg.input_lens))}-token prompts (equal shares)"


def _latency(point: RatePoint, value_ms: float, digits: int) -> str:
    """A latency figure of a rate; "-" when no request of it completed, for which `bench serve` reports 0 (as
    vLLM does) and a table would read as instant answers."""
    return f"{value_ms:.{digits}f}" if point.completed else "-"


def comparison_table(runs: list[DeploymentRun], cfg: CompareConfig) -> Table:
    table = Table(title=f"Goodput: requests with TTFT <= {cfg.ttft_slo_ms:g} ms and TPOT <= {cfg.tpot_slo_ms:g} ms, "
                        "per second", title_justify="left", box=box.SIMPLE_HEAD, caption_justify="left")
    table.caption = "; ".join(f"{run.label}: {run.description}" for run in runs) + "; latencies in ms"
    # two-line headers keep the table within 80 columns
    for col in ("rate\n/s", "deployment", "goodput\n/s", "served\n/s", "TTFT\np50", "TTFT\np99", "TPOT\np50",
                "TPOT\np99", "in\nSLO"):
        table.add_column(col, justify="left" if col == "deployment" else "right", no_wrap=True)
    for i, rate in enumerate(cfg.rates):
        for k, run in enumerate(runs):
            if i >= len(run.points):
                continue
            p = run.points[i]
            table.add_row(
                f"{rate:g}" if k == 0 else "", run.label, f"{p.goodput:.2f}", f"{p.served:.2f}",
                _latency(p, p.ttft_p50_ms, 0), _latency(p, p.ttft_p99_ms, 0), _latency(p, p.tpot_p50_ms, 1),
                _latency(p, p.tpot_p99_ms, 1),
                f"{100 * p.within_share:.0f}%",
                end_section=k == len(runs) - 1,
            )
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def load_table(runs: list[DeploymentRun], cfg: CompareConfig) -> Table:
    """Goodput under both SLO sets, ITL p99 and the utilisation the engines showed, per rate."""
    table = Table(title=f"Goodput per second, relaxed SLOs (TTFT <= {cfg.ttft_slo_ms:g} ms, TPOT <= "
                        f"{cfg.tpot_slo_ms:g} ms) and tight (TTFT <= {cfg.tight_ttft_slo_ms:g} ms, TPOT <= "
                        f"{cfg.tight_tpot_slo_ms:g} ms); engine utilisation", title_justify="left",
                  box=box.SIMPLE_HEAD, caption_justify="left")
    table.caption = ("util: share of wall time in engine steps (PD: the prefill / decode instances; colocated: "
                     "steps with prompt tokens / decode-only steps)")
    for col in ("rate\n/s", "deployment", "goodput\nrelaxed", "goodput\ntight", "ITL\np99", "prefill\nutil",
                "decode\nutil"):
        table.add_column(col, justify="left" if col == "deployment" else "right", no_wrap=True)
    for i, rate in enumerate(cfg.rates):
        shown = [run for run in runs if i < len(run.points)]
        for k, run in enumerate(shown):
            p = run.points[i]
            table.add_row(f"{rate:g}" if k == 0 else "", run.label, f"{p.goodput:.2f}", f"{p.tight_goodput:.2f}",
                          _latency(p, p.itl_p99_ms, 1), _pct(p.load.prefill_util if p.load else None),
                          _pct(p.load.decode_util if p.load else None), end_section=k == len(shown) - 1)
    return table


def prefill_compute_table(runs: list[DeploymentRun], cfg: CompareConfig, yardstick: Yardstick) -> Table:
    """Per rate, the prefill steps' FLOP rate (one instance) and its share of the matmul ceiling."""
    c = yardstick.ceiling
    ceiling = (f"a {c.n}^3 {c.dtype} product on {c.device}: {c.tflops:.3g} TFLOP/s, measured before the runs"
               if c is not None else f"none ({yardstick.no_ceiling})")
    table = Table(title=f"Prefill compute: model FLOPs of the prompt tokens per second of prefill steps, per "
                        f"instance ({yardstick.flops_per_token / 1e9:.3g} GFLOP per token of "
                        f"{prompts_text(cfg)})", title_justify="left", box=box.SIMPLE_HEAD,
                  caption_justify="left")
    table.caption = f"matmul ceiling: {escape(ceiling)}"  # a device name and an error's text, not markup
    for col in ("rate /s", "deployment", "prefill TFLOP/s", "of matmul ceiling"):
        table.add_column(col, justify="left" if col == "deployment" else "right", no_wrap=True)
    for i, rate in enumerate(cfg.rates):
        shown = [run for run in runs if i < len(run.points)]
        for k, run in enumerate(shown):
            compute = run.points[i].prefill_compute
            table.add_row(f"{rate:g}" if k == 0 else "", run.label,
                          "-" if compute is None else f"{compute.tflops:.3g}",
                          _pct(compute.of_matmul if compute else None), end_section=k == len(shown) - 1)
    return table


def advised_run(runs: list[DeploymentRun], advice: Advice) -> DeploymentRun | None:
    """The run of the advised split: the advised deployment, or the PD run when it already was that split."""
    split = (advice.best.prefill, advice.best.decode)
    return next((r for r in runs if r.kind == "advised"), None) or \
        next((r for r in runs if r.kind == "pd" and (r.prefill, r.decode) == split), None)


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
        **advice.model_dump(mode="json"), "split": advice.best.label, "slo_set": cfg.advise_for,
        "sentence": advice.sentence(), "measured_by": run.label if run is not None else None,
        "prompt_tokens_while_decoding": advice.prompt_token_cap(),
        "per_rate": [{"rate": rate, "predicted_goodput": predicted, "measured_goodput": measured}
                     for rate, predicted, measured in _per_rate(advice, run, cfg)],
    }


def advice_table(advice: Advice, runs: list[DeploymentRun], cfg: CompareConfig) -> Table:
    run = advised_run(runs, advice)
    table = Table(title=f"P:D advisor: {advice.sentence()}", title_justify="left", box=box.SIMPLE_HEAD)
    decode = run.steps.get("decode") if run is not None else None
    now = f", now {decode.prompt_tokens_while_decoding}" if decode is not None else ""
    table.caption = (f"goodput under the {cfg.advise_for} SLOs, measured on "
                     f"{run.label if run is not None else 'no run'}; where prompts run beside decodes (colocated, "
                     f"or spilled to a decode), at most {advice.prompt_token_cap()} prompt tokens a step keep "
                     f"{advice.cap_batch:.0f} streams within TPOT {advice.tpot_target_ms:g} ms by the prefill's rate "
                     f"alone, not counting a step's host work: measure it before lowering "
                     f"scheduler.prompt_tokens_while_decoding{now}")
    for col in ("rate /s", "predicted /s", "measured /s"):
        table.add_column(col, justify="right", no_wrap=True)
    for rate, predicted, measured in _per_rate(advice, run, cfg):
        table.add_row(f"{rate:g}", f"{predicted:.2f}", "-" if measured is None else f"{measured:.2f}")
    return table


def verdict(run: DeploymentRun) -> tuple[float | None, str]:
    """The highest rate `run` keeps >= 90% of requests within the SLOs at, and the sentence that says so."""
    best = highest_rate_within(run.points)
    share = f"{100 * WITHIN_SLO_SHARE:.0f}%"
    if best is None:
        lowest = min(p.rate for p in run.points)
        return None, f"{run.description} keeps < {share} of requests within the SLOs already at {lowest:g} req/s"
    tail = " (the highest rate measured: try higher rates)" if best == max(p.rate for p in run.points) else ""
    return best, f"{run.description} keeps >= {share} of requests within the SLOs up to {best:g} req/s{tail}"


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


def _capacity_text(capacity: dict[str, CapacityRow]) -> str:
    def rate(value: float | None) -> str:
        return "none" if value is None else f"{value:g} req/s"

    verdicts = {None: "neither keeps it at the lowest rate", True: "at least as good", False: "below it"}
    parts = [f"{name}: per-request disaggregation {rate(row.conditional)} against {rate(row.best_other_rate)} of "
             f"{row.best_other} ({verdicts[row.at_least_best]})" for name, row in capacity.items()]
    return (f"highest rate keeping >= {100 * WITHIN_SLO_SHARE:.0f}% of requests within the SLOs, of the rates "
            "measured: " + "; ".join(parts))


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
        if advice is not None:
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
        console.print(_capacity_text(capacity), highlight=False)
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
