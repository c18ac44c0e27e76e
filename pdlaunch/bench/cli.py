"""`pdlaunch bench ...`: typer sub-app, mounted by pdlaunch/cli.py as `bench`. Wiring only."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from pdlaunch.config.mooncake_install import INSTALL_HINT, missing_reason
from pdlaunch.errors import PdlaunchError

bench_app = typer.Typer(
    help="Load generator, KV transfer benchmark and benchmark checkpoints.",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _fail(lines: list[str]) -> typer.Exit:
    for line in lines:
        err_console.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@contextmanager
def _reported(interrupted: str | Callable[[], str]) -> Iterator[None]:
    """A command's errors as lines naming the flag (no traceback); Ctrl-C exits 130 saying `interrupted` (or what
    it returns, then)."""
    try:
        yield
    except KeyboardInterrupt:
        said = interrupted if isinstance(interrupted, str) else interrupted()
        err_console.print(f"interrupted: {escape(said)}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=130) from None
    except ValidationError as exc:
        raise _fail(_validation_lines(exc)) from None
    except PdlaunchError as exc:
        raise _fail(exc.render().splitlines()) from None


def _validation_lines(exc: ValidationError) -> list[str]:
    """One line per field, named as its flag (`random_input_len` -> `--random-input-len`)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where = f"--{loc.replace('_', '-')}: " if loc else ""
        lines.append(f"{where}{err['msg'].removeprefix('Value error, ')}")
    return lines


@bench_app.command("serve")
def serve(
    base_url: Annotated[str, typer.Option("--base-url", help="Server root, e.g. http://127.0.0.1:8000.")],
    slo_args: Annotated[
        list[str] | None,
        typer.Argument(metavar="SLO", help="More NAME:MS SLOs after --goodput, vLLM style.", show_default=False),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name; default: first of /v1/models.")] = None,
    endpoint: Annotated[
        str, typer.Option("--endpoint", help="/v1/completions or /v1/chat/completions.")
    ] = "/v1/completions",
    num_prompts: Annotated[int, typer.Option("--num-prompts", help="Requests to send.")] = 1000,
    random_input_len: Annotated[int, typer.Option("--random-input-len", help="Prompt tokens (mean).")] = 1024,
    input_lens: Annotated[str | None, typer.Option(
        "--input-lens", help="A mixed workload: prompt lengths, comma-separated (64,3072), each for an equal share of "
        "the prompts in a seeded order; replaces --random-input-len.")] = None,
    random_output_len: Annotated[int, typer.Option("--random-output-len", help="Output tokens (mean).")] = 128,
    random_range_ratio: Annotated[
        float, typer.Option("--random-range-ratio", help="Lengths uniform in mean*[1-r, 1+r], 0 <= r < 1.")
    ] = 0.0,
    request_rate: Annotated[
        float, typer.Option("--request-rate", help="Requests/s (gamma arrivals); inf sends all at once. "
                            "--multi-turn: conversations started per second.")
    ] = math.inf,
    burstiness: Annotated[
        float, typer.Option("--burstiness", help="Gamma shape: 1 Poisson, <1 burstier, >1 more regular.")
    ] = 1.0,
    max_concurrency: Annotated[
        int | None, typer.Option("--max-concurrency", help="Cap on requests in flight.")
    ] = None,
    num_warmups: Annotated[int, typer.Option("--num-warmups", help="Unmeasured requests sent first.")] = 0,
    goodput: Annotated[
        list[str] | None, typer.Option("--goodput", help="SLO NAME:MS, NAME in ttft, tpot, e2el; repeatable.")
    ] = None,
    prompt_format: Annotated[
        str | None, typer.Option("--prompt-format", help="ids | words (default: ids, words for chat).")
    ] = None,
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", help="Prompt token ids drawn from [10, V); raise it for real tokenizers.")
    ] = 500,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos/--no-ignore-eos", help="Ask for exactly max_tokens (vLLM extension).")
    ] = True,
    seed: Annotated[int, typer.Option("--seed", help="Seed for prompts, lengths and arrivals.")] = 0,
    request_timeout: Annotated[float, typer.Option("--request-timeout", help="Seconds per request.")] = 600.0,
    save_result: Annotated[bool, typer.Option("--save-result", help="Write the JSON result file.")] = False,
    result_dir: Annotated[Path, typer.Option("--result-dir", help="Folder of the JSON result file.")] = Path("."),
    result_filename: Annotated[
        str | None, typer.Option("--result-filename", help="JSON file name (implies --save-result).")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write PNG latency plots here (needs matplotlib).")
    ] = None,
    multi_turn: Annotated[bool, typer.Option(
        "--multi-turn", help="Conversations instead of independent prompts: each turn resends the conversation "
        "(shared system prompt, earlier turns and answers) plus --random-input-len new tokens; reports prompt "
        "tokens computed and KV bytes moved per request.")] = False,
    num_conversations: Annotated[int, typer.Option("--num-conversations", help="--multi-turn: conversations "
                                                   "run at once.")] = 8,
    num_turns: Annotated[int, typer.Option("--num-turns", help="--multi-turn: turns per conversation.")] = 4,
    system_prompt_len: Annotated[int, typer.Option("--system-prompt-len", help="--multi-turn: tokens of the "
                                                   "system prompt every conversation starts with.")] = 256,
) -> None:
    """Benchmark an OpenAI-compatible server: TTFT, TPOT, ITL, E2EL, throughput, goodput (vLLM definitions)."""
    from pdlaunch.bench.multi_turn import run_multi_turn
    from pdlaunch.bench.serve import run_serve_bench
    from pdlaunch.bench.serve_config import ServeBenchConfig

    stray = [a for a in slo_args or [] if ":" not in a]
    if stray:
        raise _fail([f"unexpected argument(s) {' '.join(stray)} (only NAME:MS SLOs may follow --goodput)"])
    with _reported("no report"):
        cfg = ServeBenchConfig.model_validate(dict(
            base_url=base_url, endpoint=endpoint, model=model, num_prompts=num_prompts,
            random_input_len=random_input_len, input_lens=_number_list(input_lens, "--input-lens", int),
            random_output_len=random_output_len,
            random_range_ratio=random_range_ratio, request_rate=request_rate, burstiness=burstiness,
            max_concurrency=max_concurrency, num_warmups=num_warmups, goodput=[*(goodput or []), *(slo_args or [])],
            prompt_format=prompt_format, vocab_size=vocab_size, ignore_eos=ignore_eos, seed=seed,
            request_timeout=request_timeout, save_result=save_result, result_dir=result_dir,
            result_filename=result_filename, plot_dir=plot, multi_turn=multi_turn,
            num_conversations=num_conversations, num_turns=num_turns, system_prompt_len=system_prompt_len,
        ))
        if multi_turn:
            run_multi_turn(cfg, Console())
        else:
            run_serve_bench(cfg)


@bench_app.command("make-checkpoint")
def make_checkpoint(
    out_dir: Annotated[str, typer.Argument(metavar="OUT_DIR", help="Folder to write the checkpoint into.",
                                           show_default=False)],
    shape: Annotated[
        str, typer.Option("--shape", help="llama3-8b | qwen3-30b-a3b (128 experts, top-8) | mixtral-8x7b "
                          "(8 experts, top-2).")
    ] = "llama3-8b",
    num_layers: Annotated[
        int | None, typer.Option("--num-layers", help="Decoder layers (default: the shape's, 32 or 48).")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="bfloat16 | float16 | float32.")] = "bfloat16",
    seed: Annotated[int, typer.Option("--seed", help="Weight seed.")] = 0,
    max_shard_gib: Annotated[float, typer.Option("--max-shard-gib", help="Largest safetensors shard, GiB.")] = 4.0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a folder that has files.")] = False,
    device: Annotated[str, typer.Option("--device", help="Where random values are drawn: auto | cpu | cuda.")] = "auto",
    fp8: Annotated[str | None, typer.Option("--fp8", help="Save the linear weights as FP8: block (128x128 "
                                            "weight_scale_inv) | channel (compressed-tensors per channel).")] = None,
) -> None:
    """Write a random-weight checkpoint of a real model's shape (shard by shard) for benchmarks."""
    from pdlaunch.bench.make_checkpoint import make_shaped_checkpoint, parse_dtype

    if not (max_shard_gib > 0 and math.isfinite(max_shard_gib * 2**30)):
        raise _fail([f"--max-shard-gib: {max_shard_gib:g} is not a positive size in GiB (e.g. 4; a tensor larger "
                     "than it gets a shard of its own)"])
    if not out_dir.strip():  # typer would make "" the current folder: an unset $DIR wrote the shards here
        raise _fail(["OUT_DIR: is empty (an unset variable?); give the folder to write the checkpoint into, "
                     "e.g. /data/llama3-8b-random"])
    try:
        path = make_shaped_checkpoint(
            Path(out_dir), shape=shape, num_layers=num_layers, dtype=parse_dtype(dtype), seed=seed,
            max_shard_bytes=int(max_shard_gib * 2**30), overwrite=overwrite, progress=True, device=device, fp8=fp8,
        )
    except PdlaunchError as exc:
        raise _fail(exc.render().splitlines()) from None
    typer.echo(f"checkpoint written to {path}")


@bench_app.command("kv-transfer")
def kv_transfer(
    num_tokens: Annotated[
        list[int] | None,
        typer.Option("--num-tokens", help="Prompt length(s) to move; repeatable (default: 1024 8192)."),
    ] = None,
    mode: Annotated[
        list[str] | None, typer.Option("--mode", help="pull | push; repeatable (default: both).")
    ] = None,
    num_layers: Annotated[int, typer.Option("--num-layers", help="KV layers (Llama-3-8B: 32).")] = 32,
    num_kv_heads: Annotated[int, typer.Option("--num-kv-heads", help="KV heads (Llama-3-8B: 8).")] = 8,
    head_dim: Annotated[int, typer.Option("--head-dim", help="Head size (Llama-3-8B: 128).")] = 128,
    dtype: Annotated[str, typer.Option("--dtype", help="bfloat16 | float16 | float32.")] = "bfloat16",
    kv_cache_dtype: Annotated[str, typer.Option("--kv-cache-dtype", help="auto (= --dtype) | fp8.")] = "auto",
    block_size: Annotated[int, typer.Option("--block-size", help="Tokens per KV block.")] = 16,
    device: Annotated[str, typer.Option("--device", help="Prefill side: auto | cpu | cuda | cuda:N.")] = "auto",
    decode_device: Annotated[
        str | None,
        typer.Option("--decode-device", help="Decode side (default: cuda:1 with two GPUs, else --device)."),
    ] = None,
    iterations: Annotated[int, typer.Option("--iterations", help="Timed transfers per row (median).")] = 5,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Requests started at once per timed transfer "
                                             "(disjoint blocks); a row is all of them, until the last ends.")] = 1,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for one transfer.")] = 60.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the rows here as JSON.")] = None,
    kv_connector: Annotated[
        list[str] | None,
        typer.Option("--kv-connector", help="nixl | mooncake; repeatable (default: nixl). Another connector "
                     "than nixl is measured next to NIXL (same host, same run) unless nixl cannot run here."),
    ] = None,
) -> None:
    """Move a synthetic KV cache between two processes through the real connector, in each transfer mode."""
    import json

    from pdlaunch.bench.kv_transfer import run_kv_transfer_bench
    from pdlaunch.bench.kv_transfer_report import print_kv_transfer_table
    from pdlaunch.config.rules.host import make_output_dir
    from pdlaunch.memory.platform import resolve_device

    modes = mode or ["pull", "push"]
    bad = [m for m in modes if m not in ("pull", "push")]
    if bad:
        raise _fail([f"--mode: unknown transfer mode {bad[0]!r} (pull or push)"])
    connectors = _bench_connectors(kv_connector or ["nixl"])
    try:
        if json_path is not None:  # before the run: a path that cannot be written fails now, not after it
            make_output_dir(json_path.parent, "--json")
            if json_path.is_dir():
                raise PdlaunchError(f"{str(json_path)!r} is a folder", field="--json",
                                    hint="give a file name, e.g. kv.json")
        rows = [row for connector in connectors for row in run_kv_transfer_bench(
            num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, block_size=block_size,
            num_tokens_list=num_tokens or [1024, 8192], modes=modes, device=resolve_device(device),
            decode_device=decode_device, iterations=iterations, timeout=timeout, connector=connector,
            kv_cache_dtype=kv_cache_dtype, concurrency=concurrency,
        )]
    except PdlaunchError as exc:
        raise _fail(exc.render().splitlines()) from None
    print_kv_transfer_table(Console(), rows)
    if json_path is not None:
        try:
            json_path.write_text(json.dumps(rows, indent=2) + "\n")
        except OSError as exc:
            raise _fail([f"--json: cannot write {str(json_path)!r}: {exc.strerror or exc}"]) from None
    if not all(r["verified"] for r in rows):
        raise _fail(["the decode side's KV bytes differ from the prefill side's after a transfer (rows marked NO)"])


def _bench_connectors(asked: list[str]) -> list[str]:
    """The connectors to measure, NIXL first as the reference; one that cannot be imported fails naming why."""
    bad = [c for c in asked if c not in ("nixl", "mooncake")]
    if bad:
        raise _fail([f"--kv-connector: unknown connector {bad[0]!r} (nixl or mooncake)"])
    if "mooncake" in asked:
        reason = missing_reason()
        if reason is not None:
            raise _fail([f"--kv-connector mooncake: {reason}", f"  fix: {INSTALL_HINT}"])
    connectors = list(dict.fromkeys(asked))
    if "nixl" not in connectors:
        try:
            import nixl  # noqa: F401
        except ImportError:
            return connectors
        connectors.insert(0, "nixl")
    return connectors


_N = TypeVar("_N", int, float)

def _number_list(text: str | None, flag: str, cast: type[_N]) -> list[_N] | None:
    """`"2,4,8"` -> [2, 4, 8]; None stays None. A bad item fails naming `flag`."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    kind = "integers" if cast is int else "numbers"
    if not any(items):
        raise _fail([f"{flag}: the list is empty"])
    if not all(items):  # `2,,4` or `2,4,`: a value left out, not one to drop quietly
        raise _fail([f"{flag}: {text!r} has an empty item; give {kind} separated by single commas, e.g. 2,4,8"])
    try:
        return [cast(item) for item in items]
    except ValueError:
        raise _fail([f"{flag}: {text!r} is not a comma-separated list of {kind}"]) from None


def _compare_interrupted(kept: list[Path]) -> str:
    files = (f"; the figures of the deployment runs that finished are kept: {', '.join(map(str, kept))}" if kept
             else " (no deployment run had finished)")
    return f"the running deployment was stopped and its processes reaped; no report{files}"


def _report_interrupted(kept: list[Path]) -> str:
    """What an interrupted report left: every file in `kept` is whole (compare_report writes each by renaming)."""
    unwritten = "" if any(path.name == "compare.json" for path in kept) else " before compare.json was written"
    return f"the report was cut short{unwritten}; every deployment had already stopped; kept: " + \
        ", ".join(map(str, kept))


@bench_app.command("compare")
def compare(
    model: Annotated[str, typer.Option("--model", help="HF checkpoint directory, FILE.gguf, `demo` or `tiny`.")],
    rates: Annotated[str, typer.Option("--rates", help="Offered request rates, req/s, comma-separated: 2,4,8.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for compare.json, goodput.png and the logs.")],
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
        Path | None, typer.Option("--config", help="Base deployment YAML (its instances are replaced).")
    ] = None,
    baseline: Annotated[Path | None, typer.Option(
        "--baseline", help="The --out folder of an earlier run with the same workload: its colocated and PD runs "
        "are reused and only the per-request disaggregation deployment runs (A/B of its settings).")] = None,
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
    with _reported(lambda: _compare_interrupted(kept)):
        cfg = CompareConfig.model_validate(dict(
            model=model, device=device, gpus=_number_list(gpus, "--gpus", int),
            rates=_number_list(rates, "--rates", float), num_prompts=num_prompts, duration=duration,
            input_len=input_len,
            input_lens=_number_list(input_lens, "--input-lens", int), disaggregate_min_tokens=disaggregate_min_tokens,
            disaggregate_max_queue_tokens=disaggregate_max_queue_tokens,
            disaggregate_max_itl_ms=disaggregate_max_itl_ms, output_len=output_len,
            ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms,
            tight_ttft_slo_ms=tight_ttft_slo_ms, tight_tpot_slo_ms=tight_tpot_slo_ms, advise_for=advise_for,
            run_advised=run_advised,
            colocated_instances=colocated_instances, prefill=prefill, decode=decode, burstiness=burstiness,
            seed=seed, num_warmups=num_warmups, vocab_size=vocab_size, max_model_len=max_model_len, config=config,
            baseline=baseline, request_timeout=request_timeout, ready_timeout=ready_timeout, out=out,
        ))
        comparison = run_compare(cfg, console, kept)
    # an unwritable --out or a full disk is one error line; Ctrl-C or SIGTERM leave no half-written file
    with _reported(lambda: _report_interrupted(kept)), termination_as_interrupt():
        report_comparison(console, cfg, comparison.runs, comparison.advice, comparison.yardstick, kept)
