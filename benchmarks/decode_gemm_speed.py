"""A decode batch's projections at 2-128 rows: cuBLAS (F.linear) against the dependent-launched Triton GEMM.

    python benchmarks/decode_gemm_speed.py [--rows 16 32 64] [--shapes qkv o down ...] [--deep] [--json OUT]
                                           [--compile-only --part I/N]

For each row count and projection shape (bf16), every launch of the sweep (BLOCK_N, BLOCK_K, warps and stages from
`CONFIGS`, with the split over K chosen so that the programs fill the SMs about once or twice) is checked against
F.linear (relative error < 1e-2), then timed as CUDA-graph replays of 20 calls over weight copies in rotation (at
least 256 MB, so L2 holds none), each launched dependent on the one before as in a decode step, us per call,
against the weight bytes at the copy rate measured in the same run. `--compile-only --part I/N` compiles (and
checks) the I-th of N shares of the launches and times nothing: run N of them at once to fill Triton's cache on
many cores, then the timing run compiles nothing. The fastest launch per shape and row count is what
`pdlaunch/model/decode_gemm.py`'s DECODE_GEMM_DEVICE_CONFIGS takes where it beats cuBLAS.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parent))
from limits import copy_bandwidth, graph_call_ms, launch_checks  # noqa: E402

from pdlaunch.model.decode_gemm import DecodeGemmConfig, block_m, decode_gemm  # noqa: E402

# (N, K): Llama-3-8B's qkv, o, down and gate_up; Qwen3-30B-A3B's qkv and o.
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "down": (4096, 14336), "gate_up": (28672, 4096),
          "moe-qkv": (5120, 2048), "moe-o": (2048, 4096)}
# (BLOCK_N, BLOCK_K, num_warps, num_stages, SWAP); the split over K is derived per shape (`splits`). Swapped
# operands only from 64 weight rows (the MMA's M side).
CONFIGS = [(bn, bk, w, s, swap) for bn, bk, (w, s), swap
           in itertools.product((32, 64, 128), (128, 256), ((4, 4), (4, 6), (8, 4)), (0, 1)) if bn >= 64 or not swap]
# --deep: shorter k tiles in deeper pipelines (the second sweep's best launches all sat at its deepest, 6 stages),
# for 64 and 128 rows, where x's tile is as large as the weight's.
DEEP_CONFIGS = [(bn, bk, w, s, swap) for bn, bk, (w, s), swap
                in itertools.product((32, 64, 128), (64, 128), ((4, 6), (4, 8), (8, 6)), (0, 1))
                if bn >= 64 or not swap]


def splits(n: int, k: int, block_n: int, block_k: int, sms: int) -> list[int]:
    """The splits over K whose programs fill the SMs about once, twice and four times (powers of two, each range
    at least two BLOCK_K tiles)."""
    tiles = -(-n // block_n)
    found: list[int] = []
    for target in (sms, 2 * sms, 4 * sms):
        split = 1
        while tiles * split * 2 <= target and k // (split * 2) >= 2 * block_k:
            split *= 2
        if split not in found:
            found.append(split)
    return found


def launches(n: int, k: int, rows: int, sms: int, deep: bool = False) -> list[DecodeGemmConfig]:
    out = []
    for bn, bk, warps, stages, swap in DEEP_CONFIGS if deep else CONFIGS:
        if warps == 8 and block_m(rows) < 32 and not swap:
            continue
        out += [(bn, bk, split, warps, stages, swap, 0) for split in splits(n, k, bn, bk, sms)]
    return out


def time_rows(shape: str, m: int, weights: list[torch.Tensor], floor_us: float, sms: int,
              part: tuple[int, int] | None, deep: bool = False) -> dict[str, Any]:
    n, k = weights[0].shape
    copies = len(weights)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x, weights[0]).float()
    row: dict[str, Any] = {"shape": shape, "n": n, "k": k, "rows": m, "floor_us": floor_us, "triton": {}}
    if part is None:
        row["cublas_us"] = round(graph_call_ms(lambda i: F.linear(x, weights[i % copies]), 20) * 1e3, 2)
    for index, launch in enumerate(launches(n, k, m, sms, deep)):
        if part is not None and index % part[1] != part[0]:
            continue
        if not launch_checks(lambda c=launch: decode_gemm(x, weights[0], config=c), want, f"{shape} rows {m} {launch}"):
            continue
        if part is None:
            us = graph_call_ms(lambda i, c=launch: decode_gemm(x, weights[i % copies], config=c), 20) * 1e3
            row["triton"][str(launch)] = round(us, 2)
    if part is None and row["triton"]:
        best = min(row["triton"].items(), key=lambda item: item[1])
        row["best"], row["best_us"] = best
        print(f"{shape} rows {m:3d}: floor {floor_us:6.1f} us, cuBLAS {row['cublas_us']:6.1f}, "
              f"best Triton {best[1]:6.1f} {best[0]}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--shapes", nargs="+", default=["qkv", "o", "down"], choices=sorted(SHAPES))
    parser.add_argument("--deep", action="store_true", help="sweep DEEP_CONFIGS instead of CONFIGS")
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--part", default="0/1", help="I/N: this run's share of the launches (--compile-only)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    part = tuple(int(v) for v in args.part.split("/")) if args.compile_only else None
    sweep(args.shapes, args.rows, part, args.json,
          lambda shape, m, weights, floor_us, sms: time_rows(shape, m, weights, floor_us, sms,
                                                             part, args.deep))  # type: ignore[arg-type]


def sweep(shapes: list[str], rows: list[int], part: tuple[int, ...] | None, json_path: Path | None,
          time_one: Callable[[str, int, list[torch.Tensor], float, int], dict[str, Any]]) -> None:
    """For each shape, bf16 weight copies in rotation (at least 256 MB; one with --compile-only), then
    time_one(shape, rows, weights, floor_us, SMs) per row count; the rows with the copy rate to `json_path`."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    doc: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if part is None:
        doc.update(copy_bandwidth(2.0))
    bw = doc.get("copy_gbps", 1.0) * 1e9
    doc["rows"] = []
    for shape in shapes:
        n, k = SHAPES[shape]
        nbytes = n * k * 2
        copies = 1 if part is not None else max(2, -(-(256 << 20) // nbytes))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        doc["rows"] += [time_one(shape, m, weights, round(nbytes / bw * 1e6, 2), sms) for m in rows]
        del weights
        torch.cuda.empty_cache()
    if json_path and part is None:
        json_path.write_text(json.dumps(doc, indent=1))

if __name__ == "__main__":
    main()
