"""`pdlaunch bench kv-transfer`'s flags and output (the measurement: kv_transfer.py); bench/cli.py mounts it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from pdlaunch.bench.cli_errors import fail, path_flag
from pdlaunch.config.mooncake_install import INSTALL_HINT, missing_reason
from pdlaunch.errors import PdlaunchError


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
    json_file: Annotated[str | None, typer.Option("--json", metavar="PATH", help="Write the rows here as JSON.")
                         ] = None,
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
        raise fail([f"--mode: unknown transfer mode {bad[0]!r} (pull or push)"])
    connectors = _bench_connectors(kv_connector or ["nixl"])
    json_path = path_flag(json_file, "--json", "a file name, e.g. kv.json, or drop the flag")
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
        raise fail(exc.render().splitlines()) from None
    print_kv_transfer_table(Console(), rows)
    if json_path is not None:
        try:
            json_path.write_text(json.dumps(rows, indent=2) + "\n")
        except OSError as exc:
            raise fail([f"--json: cannot write {str(json_path)!r}: {exc.strerror or exc}"]) from None
    if not all(r["verified"] for r in rows):
        raise fail(["the decode side's KV bytes differ from the prefill side's after a transfer (rows marked NO)"])


def _bench_connectors(asked: list[str]) -> list[str]:
    """The connectors to measure, NIXL first as the reference; one that cannot be imported fails naming why."""
    bad = [c for c in asked if c not in ("nixl", "mooncake")]
    if bad:
        raise fail([f"--kv-connector: unknown connector {bad[0]!r} (nixl or mooncake)"])
    if "mooncake" in asked:
        reason = missing_reason()
        if reason is not None:
            raise fail([f"--kv-connector mooncake: {reason}", f"  fix: {INSTALL_HINT}"])
    connectors = list(dict.fromkeys(asked))
    if "nixl" not in connectors:
        try:
            import nixl  # noqa: F401
        except ImportError:
            return connectors
        connectors.insert(0, "nixl")
    return connectors

