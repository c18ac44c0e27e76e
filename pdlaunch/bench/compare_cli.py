"""`pdlaunch bench compare`'s flags and its interrupted messages (the run: compare.py, the report:
compare_report.py); bench/cli.py mounts it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pdlaunch.bench.cli_errors import number_list, path_flag, reported


def _compare_interrupted(kept: list[Path]) -> str:
    files = (f"; the figures of the deployment runs that finished are kept: {', '.join(map(str, kept))}" if kept
             else " (no deployment run had finished)")
    return f"the running deployment was stopped and its processes reaped; no report{files}"


def _report_interrupted(kept: list[Path]) -> str:
    """What an interrupted report left: every file in `kept` is whole (compare_report writes each by renaming)."""
    unwritten = "" if any(path.name == "compare.json" for path in kept) else " before compare.json was written"
    return f"the report was cut short{unwritten}; every deployment had already stopped; kept: " + \
        ", ".join(map(str, kept))


def compare(
    model: Annotated[str, typer.Option("--model", help="HF checkpoint directory, FILE.gguf, `demo` or `tiny`.")],
    rates: Annotated[str, typer.Option("--rates", help="Offered request rates, req/s, comma-separated: 2,4,8.")],
    out: Annotated[str, typer.Option("--out", metavar="PATH",
                                     help="Folder for compare.json, goodput.png and the logs.")],
    gpus: Annotated[
        str | None, typer.Option("--gpus", help="GPU indices both deployments use, e.g. 0,1 (default: 0..P+D-1).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")] = "auto",
    num_prompts: Annotated[int, typer.Option("--num-prompts", help="Requests per rate.")] = 160,
    duration: Annotated[float | None, typer.Option(
        "--duration", help="Seconds of arrivals per rate instead of --num-prompts: each rate sends rate x S "
        "requests, so a high rate is measured over as long a stretch as a low one.")] = None,
    input_len: Annotated[int, typer.Option("--input-len", help="Prompt tokens per request.")] = 3072,
    input_lens: Annotated[str | None, typer.Option(
        "--input-lens", help="A mixed workload instead of --input-len: prompt lengths, comma-separated (64,3072), "
        "each for an equal share of the requests.")] = None,
    output_len: Annotated[int, typer.Option("--output-len", help="Output tokens per request (ignore_eos).")] = 128,
    ttft_slo_ms: Annotated[float, typer.Option("--ttft-slo-ms", help="TTFT SLO, ms.")] = 400.0,
    tpot_slo_ms: Annotated[float, typer.Option("--tpot-slo-ms", help="TPOT SLO, ms.")] = 15.0,
    tight_ttft_slo_ms: Annotated[
        float, typer.Option("--tight-ttft-slo-ms", help="TTFT of the second (tight) SLO set, ms.")] = 1000.0,
    tight_tpot_slo_ms: Annotated[
        float, typer.Option("--tight-tpot-slo-ms", help="TPOT of the second (tight) SLO set, ms.")] = 10.0,
    advise_for: Annotated[
        str, typer.Option("--advise-for", help="relaxed | tight: the SLO set the P:D advisor sizes decode for.")
    ] = "relaxed",
    run_advised: Annotated[
        bool, typer.Option("--run-advised/--no-run-advised", help="Run the advised xPyD split when it differs "
                           "from --prefill/--decode.")
    ] = True,
    colocated_instances: Annotated[
        int | None, typer.Option("--colocated-instances", help="Colocated instances (default: one per GPU; "
                                    "CPU: prefill + decode).")
    ] = None,
    disaggregate_min_tokens: Annotated[int | None, typer.Option(
        "--disaggregate-min-tokens", help="Also run the PD split with per-request disaggregation: prompts of fewer "
        "uncached tokens run on a decode alone (proxy.disaggregate_min_tokens); reports its goodput against the "
        "better of always-PD and colocated.")] = None,
    disaggregate_max_queue_tokens: Annotated[int | None, typer.Option(
        "--disaggregate-max-queue-tokens", help="In that deployment, prompts that would go PD run on their "
        "decode alone too while every prefill has this many prompt tokens queued "
        "(proxy.disaggregate_max_queue_tokens).")] = None,
    disaggregate_max_itl_ms: Annotated[float | None, typer.Option(
        "--disaggregate-max-itl-ms", help="In that deployment, prompts that would run on their decode alone "
        "go PD while its streams wait this many ms or more per token (proxy.disaggregate_max_itl_ms).")] = None,
    prefill: Annotated[int, typer.Option("--prefill", help="Prefill instances of the PD deployment.")] = 1,
    decode: Annotated[int, typer.Option("--decode", help="Decode instances of the PD deployment.")] = 1,
    burstiness: Annotated[
        float, typer.Option("--burstiness", help="Gamma shape of arrivals: 1 Poisson, <1 burstier.")
    ] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Workload seed (rate i uses seed + i).")] = 0,
    num_warmups: Annotated[int, typer.Option("--num-warmups", help="Unmeasured requests before each rate.")] = 2,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Prompt token ids drawn from [10, V).")] = 500,
    max_model_len: Annotated[int | None, typer.Option("--max-model-len", help="Longest prompt + output.")] = None,
    config: Annotated[
        str | None, typer.Option("--config", metavar="PATH",
                                 help="Base deployment YAML (its instances are replaced).")
    ] = None,
    baseline: Annotated[str | None, typer.Option(
        "--baseline", metavar="PATH", help="The --out folder of an earlier run with the same workload: its colocated "
        "and PD runs are reused and only the per-request disaggregation deployment runs (A/B of its settings).")
    ] = None,
    request_timeout: Annotated[float, typer.Option("--request-timeout", help="Seconds per request.")] = 600.0,
    ready_timeout: Annotated[
        float, typer.Option("--ready-timeout", help="Seconds to wait for a deployment to be ready.")
    ] = 900.0,
) -> None:
    """Colocated instances, then a PD deployment (and with --disaggregate-min-tokens the same split with per-request
    disaggregation), on the same devices: goodput (two SLO sets), TTFT, TPOT, ITL p99 and utilisation per rate,
    side by side; then the advised xPyD split, predicted against measured."""
    from pdlaunch.bench.compare import run_compare, termination_as_interrupt
    from pdlaunch.bench.compare_config import CompareConfig
    from pdlaunch.bench.compare_report import report_comparison

    console = Console()
    kept: list[Path] = []  # OUT/<kind>.json of each deployment run done
    with reported(lambda: _compare_interrupted(kept)):
        cfg = CompareConfig.model_validate(dict(
            model=model, device=device, gpus=number_list(gpus, "--gpus", int, "0,1"),
            rates=number_list(rates, "--rates", float, "2,4,8"), num_prompts=num_prompts, duration=duration,
            input_len=input_len, input_lens=number_list(input_lens, "--input-lens", int, "64,3072"),
            disaggregate_min_tokens=disaggregate_min_tokens,
            disaggregate_max_queue_tokens=disaggregate_max_queue_tokens,
            disaggregate_max_itl_ms=disaggregate_max_itl_ms, output_len=output_len,
            ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms,
            tight_ttft_slo_ms=tight_ttft_slo_ms, tight_tpot_slo_ms=tight_tpot_slo_ms, advise_for=advise_for,
            run_advised=run_advised,
            colocated_instances=colocated_instances, prefill=prefill, decode=decode, burstiness=burstiness,
            seed=seed, num_warmups=num_warmups, vocab_size=vocab_size, max_model_len=max_model_len,
            config=path_flag(config, "--config", "the base deployment YAML, or drop the flag"),
            baseline=path_flag(baseline, "--baseline", "the --out folder of an earlier run, or drop the flag"),
            request_timeout=request_timeout, ready_timeout=ready_timeout,
            out=path_flag(out, "--out", "the folder to write the report into, e.g. --out compare/"),
        ))
        comparison = run_compare(cfg, console, kept)
    # an unwritable --out or a full disk is one error line; Ctrl-C or SIGTERM leave no half-written file (the report
    # holds no connection, so a stop may raise anywhere in it)
    with reported(lambda: _report_interrupted(kept)), termination_as_interrupt() as stop, stop.raising():
        report_comparison(console, cfg, comparison.runs, comparison.advice, comparison.yardstick, kept)
