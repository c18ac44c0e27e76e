"""`pdlaunch bench compare`'s tables per rate, the deployments side by side: latencies and goodput; goodput under
both SLO sets, ITL p99 and prefill and decode utilisation; the prefill steps' FLOP rate and its share of the matmul
ceiling."""

from __future__ import annotations

from rich import box
from rich.markup import escape
from rich.table import Table

from pdlaunch.bench.compare_config import CompareConfig
from pdlaunch.bench.goodput import RatePoint
from pdlaunch.bench.matmul_ceiling import Yardstick
from pdlaunch.bench.rate_sweep import DeploymentRun


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
