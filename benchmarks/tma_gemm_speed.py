"""A decode batch's projections at 64-128 rows with the weight streamed by the tensor-memory accelerator (TMA):
cuBLAS against a Triton GEMM whose x and weight tiles come through host-made tensor descriptors, pipelined.

    python benchmarks/tma_gemm_speed.py [--rows 64 128] [--shapes qkv o down gate_up] [--json OUT]
                                        [--compile-only --part I/N] [--check-only]

The pointer GEMM of model/decode_gemm.py lost to cuBLAS at 128 rows for every projection (x's tile is as large as
the weight's; RESULTS.md, "deeper pipelines"). Its TMA launches (the config's last field 1) read each tile with one
TMA copy into shared memory, the pipeliner keeps `stages` of them in flight, and the products run as warpgroup MMAs.
Each launch (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages, SWAP, 1) is checked against F.linear, then timed as
CUDA-graph replays of 20 calls over weight copies in rotation (L2 holds none), us per call, against the weight
bytes at the copy rate measured in the same run.
`--check-only` runs the kernel at small shapes against float64 (works under TRITON_INTERPRET=1). The JSON has
decode_gemm_speed.py's form, so `decode_grid.py --decode-gemm-table` takes it.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))

from decode_gemm_speed import SHAPES, splits, sweep  # noqa: E402

from pdlaunch.model.decode_gemm import DecodeGemmConfig, block_m, decode_gemm  # noqa: E402
from pdlaunch.model.triton_env import interpret_mode  # noqa: E402

SMEM_BYTES = 227 * 1024


def smem_ok(rows: int, block_n: int, block_k: int, stages: int) -> bool:
    return stages * (block_m(rows) + block_n) * block_k * 2 + 4096 <= SMEM_BYTES


CONFIGS = list(itertools.product((64, 128, 256), (64, 128), (4, 8), (3, 4, 6, 8), (0, 1)))


def launches(n: int, k: int, rows: int, sms: int) -> list[DecodeGemmConfig]:
    out = []
    for bn, bk, warps, stages, swap in CONFIGS:
        if not smem_ok(rows, bn, bk, stages) or (bn == 256 and not swap and warps == 4):
            continue
        out += [(bn, bk, split, warps, stages, swap, 1) for split in splits(n, k, bn, bk, sms)]
    return out


def check_only() -> None:
    """Small shapes against float64 rounded once: rows that fill no tile, several splits, both operand orders, a
    bias, x a view into a wider buffer."""
    device = "cuda" if torch.cuda.is_available() and not interpret_mode() else "cpu"
    torch.manual_seed(0)
    for rows, n, k, config, bias in ((5, 96, 256, (64, 64, 1, 4, 2, 0, 1), False),
                                     (64, 128, 512, (64, 64, 2, 4, 3, 1, 1), True),
                                     (100, 192, 384, (64, 128, 2, 4, 2, 1, 1), False),
                                     (128, 64, 512, (64, 64, 4, 4, 2, 0, 1), True)):
        wide = torch.randn(rows, k + 64, device=device, dtype=torch.bfloat16)
        x = wide[:, :k]
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.05
        b = torch.randn(n, device=device, dtype=torch.bfloat16) if bias else None
        got = decode_gemm(x, w, b, config=config).double()
        want = x.double() @ w.double().T + (b.double() if b is not None else 0.0)
        err = ((got - want).norm() / want.norm()).item()
        print(f"rows {rows} n {n} k {k} {config} bias {bias}: rel err {err:.2e}", flush=True)
        assert err < 4e-3, err


def time_rows(shape: str, m: int, weights: list[torch.Tensor], floor_us: float, sms: int,
              part: tuple[int, ...] | None) -> dict[str, Any]:
    """One row count of one shape: cuBLAS, then every TMA launch of the sweep (only `part`'s share, compiled and
    checked but not timed, with --compile-only), us per call."""
    from limits import graph_call_ms, launch_checks

    n, k = weights[0].shape
    copies = len(weights)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x, weights[0]).float()
    row: dict[str, Any] = {"shape": shape, "n": n, "k": k, "rows": m, "floor_us": floor_us, "tma": {}}
    if part is None:
        row["cublas_us"] = round(graph_call_ms(lambda i: F.linear(x, weights[i % copies]), 20) * 1e3, 2)
    for index, launch in enumerate(launches(n, k, m, sms)):
        if part is not None and index % part[1] != part[0]:
            continue
        if not launch_checks(lambda c=launch: decode_gemm(x, weights[0], config=c), want, f"{shape} {m} {launch}"):
            continue
        if part is None:
            us = graph_call_ms(lambda i, c=launch: decode_gemm(x, weights[i % copies], config=c), 20) * 1e3
            row["tma"][str(launch)] = round(us, 2)
    if part is None and row["tma"]:
        best = sorted(row["tma"].items(), key=lambda item: item[1])[:3]
        row["best"], row["best_us"] = best[0]  # the form limits.decode_gemm_table reads
        print(f"{shape} rows {m:3d}: floor {floor_us:6.1f} us, cuBLAS {row['cublas_us']:6.1f}, TMA best {best}",
              flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--shapes", nargs="+", default=["qkv", "o", "down", "gate_up"], choices=sorted(SHAPES))
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--part", default="0/1")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.check_only:
        check_only()
        return
    part = tuple(int(v) for v in args.part.split("/")) if args.compile_only else None
    sweep(args.shapes, args.rows, part, args.json,
          lambda shape, m, weights, floor_us, sms: time_rows(shape, m, weights, floor_us, sms, part))

if __name__ == "__main__":
    main()
