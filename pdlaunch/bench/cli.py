"""`pdlaunch bench ...`: typer sub-app, mounted by pdlaunch/cli.py as `bench`. Wiring only: `serve` and
`make-checkpoint` here, `kv-transfer` in kv_transfer_cli.py, `compare` in compare_cli.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pdlaunch.bench.cli_errors import fail, number_list, path_flag, reported
from pdlaunch.bench.compare_cli import compare
from pdlaunch.bench.kv_transfer_cli import kv_transfer
from pdlaunch.errors import PdlaunchError

bench_app = typer.Typer(
    help="Load generator, KV transfer benchmark and benchmark checkpoints.",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@bench_app.command("serve")
def serve(
    base_url: Annotated[str, typer.Option("--base-url", help="Server root, e.g. http://127.0.0.1:8000.")],
    slo_args: Annotated[
        list[str] | None,
        typer.Argument(metavar="SLO", help="More NAME:MS SLOs after --goodput, vLLM style.", show_default=False),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name; default: first of /v1/models.")] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="PDLAUNCH_API_KEY", show_default=False,
        help="Sent as Authorization: Bearer KEY, for a deployment served with --api-key (env PDLAUNCH_API_KEY).")
    ] = None,
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
    result_dir: Annotated[str, typer.Option("--result-dir", metavar="PATH", help="Folder of the JSON result file.")
                          ] = ".",
    result_filename: Annotated[
        str | None, typer.Option("--result-filename",
                                 help="JSON file name under --result-dir, or an absolute path (implies --save-result).")
    ] = None,
    plot: Annotated[
        str | None, typer.Option("--plot", metavar="PATH", help="Write PNG latency plots here (needs matplotlib).")
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
    last_answer_len: Annotated[int | None, typer.Option(
        "--last-answer-len", help="--multi-turn: tokens asked for each conversation's last answer, which no turn "
        "resends (default: --random-output-len); a few end the run sooner, every prompt sent the same.")
    ] = None,
) -> None:
    """Benchmark an OpenAI-compatible server: TTFT, TPOT, ITL, E2EL, throughput, goodput (vLLM definitions)."""
    from pdlaunch.bench.multi_turn import run_multi_turn
    from pdlaunch.bench.serve import run_serve_bench
    from pdlaunch.bench.serve_config import ServeBenchConfig

    stray = [a for a in slo_args or [] if ":" not in a]
    if stray:
        raise fail([f"unexpected argument(s) {' '.join(stray)} (only NAME:MS SLOs may follow --goodput)"])
    with reported("no report"):
        cfg = ServeBenchConfig.model_validate(dict(
            base_url=base_url, api_key=api_key or None, endpoint=endpoint, model=model, num_prompts=num_prompts,
            random_input_len=random_input_len, input_lens=number_list(input_lens, "--input-lens", int, "64,3072"),
            random_output_len=random_output_len,
            random_range_ratio=random_range_ratio, request_rate=request_rate, burstiness=burstiness,
            max_concurrency=max_concurrency, num_warmups=num_warmups, goodput=[*(goodput or []), *(slo_args or [])],
            prompt_format=prompt_format, vocab_size=vocab_size, ignore_eos=ignore_eos, seed=seed,
            request_timeout=request_timeout, save_result=save_result,
            result_dir=path_flag(result_dir, "--result-dir", "the folder for the result file, or drop the flag"),
            result_filename=result_filename, plot_dir=path_flag(plot, "--plot", "the folder for the plots, or drop "
                                                                "the flag"), multi_turn=multi_turn,
            num_conversations=num_conversations, num_turns=num_turns, system_prompt_len=system_prompt_len,
            last_answer_len=last_answer_len,
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
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Write into a folder that has files (an earlier checkpoint's model*.safetensors and index "
                            "there are replaced; other files stay).")] = False,
    device: Annotated[str, typer.Option("--device", help="Where random values are drawn: auto | cpu | cuda.")] = "auto",
    fp8: Annotated[str | None, typer.Option("--fp8", help="Save the linear weights as FP8: block (128x128 "
                                            "weight_scale_inv) | channel (compressed-tensors per channel).")] = None,
) -> None:
    """Write a random-weight checkpoint of a real model's shape (shard by shard) for benchmarks."""
    from pdlaunch.bench.make_checkpoint import make_shaped_checkpoint, parse_dtype

    if not (max_shard_gib > 0 and math.isfinite(max_shard_gib * 2**30)):
        raise fail([f"--max-shard-gib: {max_shard_gib:g} is not a positive size in GiB (e.g. 4; a tensor larger "
                    "than it gets a shard of its own)"])
    if not out_dir.strip():  # typer would make "" the current folder: an unset $DIR wrote the shards here
        raise fail(["OUT_DIR: is empty (an unset variable?); give the folder to write the checkpoint into, "
                    "e.g. /data/llama3-8b-random"])
    try:
        path = make_shaped_checkpoint(
            Path(out_dir), shape=shape, num_layers=num_layers, dtype=parse_dtype(dtype), seed=seed,
            max_shard_bytes=int(max_shard_gib * 2**30), overwrite=overwrite, progress=True, device=device, fp8=fp8,
        )
    except PdlaunchError as exc:
        raise fail(exc.render().splitlines()) from None
    typer.echo(f"checkpoint written to {path}")


bench_app.command("kv-transfer")(kv_transfer)
bench_app.command("compare")(compare)
