"""The paged decode kernel on an attention shape without a model: by default Qwen3-30B-A3B's (4 KV heads, groups of
8 query heads, head_dim 128; `--kv-heads 8` is Llama-3-8B's), the launch `choose_launch` picks and, with `--sweep`,
every launch configuration of decode_sweep.py, at the given cells, against the copy bandwidth measured in the same
run.

    python benchmarks/decode_gqa.py [--cells 64x1024 1x1024] [--kv-heads 4] [--kv-cache-dtype fp8] [--sweep]
                                    [--launches 128x64x4x2x128 ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_grid import KernelBench  # noqa: E402
from decode_sweep import sweep  # noqa: E402
from limits import copy_bandwidth, fill_kv_caches  # noqa: E402

from pdlaunch.model.decode_launch import MIN_SPLIT_TOKENS, DecodeLaunch, choose_launch  # noqa: E402
from pdlaunch.model.triton_decode import paged_decode  # noqa: E402

HEADS, HEAD_DIM, BLOCK = 32, 128, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["64x1024", "1x1024", "16x1024", "256x1024", "10x2560"])
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                        help="fp8: the cache in e4m3 (the bf16 fill converted), queries bf16")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--launches", nargs="*", default=[], metavar="TILExSPLITSxWARPSxSTAGES[xMIN_TOKENS]",
                        help="also time these launches at every cell, e.g. 128x2x4x2 (splits beyond the one-wave "
                             "rule) or 128x64x4x2x128 (ranges of 128 tokens or more at every context; default "
                             "MIN_SPLIT_TOKENS)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    kv_heads = args.kv_heads
    cells = [tuple(int(v) for v in c.split("x")) for c in args.cells]
    tokens = max(b * c for b, c in cells) * 2
    cache = torch.empty(-(-tokens // BLOCK), 1, 2, BLOCK, kv_heads, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    fill_kv_caches([cache])
    if args.kv_cache_dtype == "fp8":
        cache = cache.to(torch.float8_e4m3fn)
    engine = SimpleNamespace(runner=SimpleNamespace(kv_caches=[cache]),
                             checkpoint=SimpleNamespace(arch=SimpleNamespace(num_heads=HEADS, head_dim=HEAD_DIM)))
    bench = KernelBench(engine)  # type: ignore[arg-type]
    copy = copy_bandwidth(2.0)["copy_gbps"] * 1e9
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    doc: dict[str, Any] = {"device": torch.cuda.get_device_name(), "kv_heads": kv_heads, "copy_gbps": copy / 1e9,
                           "kv_cache_dtype": str(cache.dtype), "chosen": []}
    for batch, context in cells:
        launch = choose_launch(batch, kv_heads, HEAD_DIM, sms, element_size=cache.element_size())
        ms = bench.time(paged_decode, batch, context)
        gbps = bench.kv_bytes(batch, context) / ms / 1e6
        row = {"batch": batch, "context": context, "launch": launch.__dict__, "us": ms * 1e3, "gbps": gbps,
               "of_copy": gbps * 1e9 / copy}
        print(json.dumps(row), flush=True)
        doc["chosen"].append(row)
        for spec in args.launches:
            tile, splits, warps, stages, *rest = (int(v) for v in spec.split("x"))
            min_tokens = rest[0] if rest else MIN_SPLIT_TOKENS
            other = DecodeLaunch(tile, splits, max(1, min_tokens // tile), warps, stages)
            ms = bench.time(paged_decode, batch, context, launch=other)
            gbps = bench.kv_bytes(batch, context) / ms / 1e6
            row = {"batch": batch, "context": context, "launch": other.__dict__, "us": ms * 1e3, "gbps": gbps,
                   "of_copy": gbps * 1e9 / copy, "rel_err": bench.check(batch, context, other)}
            print(json.dumps(row), flush=True)
            doc.setdefault("launches", []).append(row)
    if args.sweep:
        doc["sweep"] = sweep(bench, copy, cells)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
