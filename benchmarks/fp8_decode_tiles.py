"""Paged decode over an FP8 (e4m3) KV cache: `choose_launch`'s launch against fixed tiles and splits.

    python benchmarks/fp8_decode_tiles.py --kv-heads 8 --heads 32 --cells 48x3072 64x1024 [--json OUT]

A random e4m3 cache of one layer (no engine, no checkpoint). Each cell is timed as the engine runs it: a CUDA graph
of GRAPH_CALLS calls, each over other blocks than the last (enough disjoint block sets that one graph reads more KV
than L2 holds), and given as the share of copy bandwidth (KV bytes / time against limits.copy_bandwidth). Every
launch's output is compared with float64 attention over the same fp8 keys and values (first 4 sequences).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a tree put there wins
from limits import copy_bandwidth, graph_call_ms  # noqa: E402

from pdlaunch.model.decode_launch import DecodeLaunch  # noqa: E402
from pdlaunch.model.triton_decode import paged_decode  # noqa: E402

GRAPH_CALLS = 10
BLOCK_SIZE = 16
HEAD_DIM = 128
CACHE_BYTES = 2 << 30  # one layer's cache: disjoint block sets for the largest cells
# (tile, splits, min tiles a range) at 4 warps, 2 stages; None = choose_launch's pick
LAUNCHES: list[tuple[int, int, int] | None] = [None, (128, 1, 1), (64, 1, 1), (64, 2, 2), (128, 2, 1), (32, 1, 1)]


def cell(cache: torch.Tensor, heads: int, batch: int, context: int, copy_bps: float) -> dict[str, Any]:
    num_blocks, _, _, _, kv_heads, _ = cache.shape
    per_seq = -(-context // BLOCK_SIZE)
    sets = max(1, min(GRAPH_CALLS, num_blocks // (batch * per_seq)))
    tables = torch.randperm(num_blocks, device="cuda")[:sets * batch * per_seq].view(sets, batch, per_seq)
    tables = tables.to(torch.int32)
    q = torch.randn(batch, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    tokens = torch.arange(batch, device="cuda")
    scale = HEAD_DIM**-0.5
    pos = torch.arange(context, device="cuda")
    rows = tables[0][:4][:, pos // BLOCK_SIZE].long()
    k = cache[rows, 0, 0, pos % BLOCK_SIZE].double().repeat_interleave(heads // kv_heads, 2)
    v = cache[rows, 0, 1, pos % BLOCK_SIZE].double().repeat_interleave(heads // kv_heads, 2)
    want = torch.einsum("shc,schd->shd", (torch.einsum("shd,schd->shc", q[:4].double(), k) * scale).softmax(-1), v)
    kv_bytes = batch * context * kv_heads * HEAD_DIM * 2 * cache.element_size()
    out: dict[str, Any] = {"cell": f"{batch}x{context}", "programs": batch * kv_heads, "block_sets": sets}
    # One untimed run of graphs first: the first cell's first timing read 12% slow on an H100 (clocks ramping).
    graph_call_ms(lambda i: paged_decode(q, cache, 0, tokens, tables[i % sets], lens, None, scale), GRAPH_CALLS)
    for launch in LAUNCHES:
        label = "chosen" if launch is None else "t{}_s{}_m{}".format(*launch)
        extra = {} if launch is None else {"launch": DecodeLaunch(launch[0], launch[1], launch[2], 4, 2)}
        decode = functools.partial(paged_decode, q, cache, 0, tokens, block_table=None, seq_lens=lens, window=None,
                                   scale=scale, **extra)
        got = decode(block_table=tables[0])[:4].double()
        ms = graph_call_ms(lambda i, decode=decode: decode(block_table=tables[i % sets]), GRAPH_CALLS)
        out[label] = {"us": round(ms * 1e3, 1), "of_copy": round(kv_bytes / (ms / 1e3) / copy_bps, 3),
                      "rel_err": round(((got - want).norm() / want.norm()).item(), 5)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--cells", nargs="+", default=["48x3072", "64x1024", "128x512", "32x2048"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    copy_bps = copy_bandwidth(1.0)["copy_gbps"] * 1e9
    token_bytes = 2 * args.kv_heads * HEAD_DIM
    num_blocks = CACHE_BYTES // (token_bytes * BLOCK_SIZE)
    cache = (torch.randn(num_blocks, 1, 2, BLOCK_SIZE, args.kv_heads, HEAD_DIM, device="cuda") * 0.5)
    cache = cache.to(torch.float8_e4m3fn)
    doc: dict[str, Any] = {"device": torch.cuda.get_device_name(), "copy_gbps": copy_bps / 1e9,
                           "kv_heads": args.kv_heads, "heads": args.heads, "cells": []}
    for c in args.cells:
        batch, context = (int(x) for x in c.split("x"))
        row = cell(cache, args.heads, batch, context, copy_bps)
        doc["cells"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
