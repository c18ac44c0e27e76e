"""A decode batch's SwiGLU: cuBLAS's gate_up GEMM + the silu_and_mul launch against one Triton launch.

    python benchmarks/swiglu_speed.py [--rows 2 8 16 32 64 128] [--shapes 8b ...] [--json OUT]

For each row count and gate_up shape (bf16), every launch of the sweep (`CONFIGS`, with BLOCK_M the rows rounded
up to a power of two, 16 to 128) is checked against F.linear + silu_and_mul (relative error < 1e-2), then timed as
CUDA-graph replays of 20 calls over weight copies in rotation (at least 256 MB, so L2 holds none), us per call,
against the weight bytes at the copy rate measured in the same run. The fastest launch per row count is what
`pdlaunch/model/swiglu.py`'s SWIGLU_DEVICE_CONFIGS takes where it beats the two launches.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parent))
from limits import copy_bandwidth, graph_call_ms, launch_checks  # noqa: E402

from pdlaunch.model.fused_ops import silu_and_mul  # noqa: E402
from pdlaunch.model.swiglu import swiglu_gemm  # noqa: E402

# (hidden K, intermediate I): Llama-3-8B, the same at TP 2, Qwen3-8B / Qwen2.5-7B-like, Llama-3.2-3B.
SHAPES = {"8b": (4096, 14336), "8b-tp2": (4096, 7168), "qwen3-8b": (4096, 12288), "3b": (3072, 8192)}
# (BLOCK_N, BLOCK_K, num_warps, num_stages, TMA); 8 warps only from 32-row tiles. --tma: the TMA kernel's launches
# (deeper pipelines, within the SM's shared memory), instead.
CONFIGS = [(*c, 0) for c in itertools.product((32, 64, 128), (64, 128), (4, 8), (3, 4))]
TMA_CONFIGS = [(*c, 1) for c in itertools.product((32, 64, 128), (64, 128), (4, 8), (3, 4, 5, 6))]
SMEM_BYTES = 227 * 1024


def block_m(rows: int) -> int:
    return min(128, max(16, 1 << (rows - 1).bit_length()))


def time_rows(shape: str, m: int, weights: list[torch.Tensor], floor_us: float,
              block_ms: list[int] | None = None, tma: bool = False) -> dict[str, Any]:
    """One row count of one shape: the two launches, then every launch of the sweep (BLOCK_M from `block_ms`,
    default the rows rounded up), us per call."""
    k = weights[0].shape[1]
    copies = len(weights)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = silu_and_mul(F.linear(x, weights[0])).float()
    two = graph_call_ms(lambda i: silu_and_mul(F.linear(x, weights[i % copies])), 20) * 1e3
    row: dict[str, Any] = {"shape": shape, "k": k, "inter": weights[0].shape[0] // 2, "rows": m,
                           "floor_us": floor_us, "cublas_silu_us": round(two, 2), "triton": {}}
    for bm, config in itertools.product(block_ms or [block_m(m)], TMA_CONFIGS if tma else CONFIGS):
        launch = (bm, *config)
        if config[2] == 8 and bm < 32:
            continue
        if tma and config[3] * (bm + 2 * config[0]) * config[1] * 2 + 4096 > SMEM_BYTES:
            continue
        if not launch_checks(lambda c=launch: swiglu_gemm(x, weights[0], config=c), want, f"{shape} rows {m} {launch}"):
            continue
        us = graph_call_ms(lambda i, c=launch: swiglu_gemm(x, weights[i % copies], config=c), 20) * 1e3
        row["triton"][str(launch)] = round(us, 2)
    best = min(row["triton"].items(), key=lambda item: item[1])
    row["best"], row["best_us"] = best
    print(f"{shape} rows {m:3d}: floor {floor_us:6.1f} us, cuBLAS + silu_and_mul {two:6.1f}, "
          f"best Triton {best[1]:6.1f} {best[0]}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 8, 16, 32, 64, 128])
    parser.add_argument("--shapes", nargs="+", default=["8b"], choices=sorted(SHAPES))
    parser.add_argument("--block-m", type=int, nargs="+", help="BLOCK_M values to sweep (default: rows rounded up)")
    parser.add_argument("--tma", action="store_true", help="sweep the TMA kernel's launches (TMA_CONFIGS)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    doc: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    doc.update(copy_bandwidth(2.0))
    bw = doc["copy_gbps"] * 1e9
    doc["rows"] = []
    for shape in args.shapes:
        k, inter = SHAPES[shape]
        nbytes = 2 * inter * k * 2
        copies = max(2, -(-(256 << 20) // nbytes))
        weights = [torch.randn(2 * inter, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        floor_us = round(nbytes / bw * 1e6, 2)
        doc["rows"] += [time_rows(shape, m, weights, floor_us, args.block_m, args.tma) for m in args.rows]
        del weights
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))

if __name__ == "__main__":
    main()
