"""Decode projections at 16-256 rows: F.linear(x, W) against the swapped product (W @ x^T)^T, in one run.

    python benchmarks/swap_gemm.py [--rows 16 32 64 128 256] [--json OUT]

cuBLAS picks its kernel from the problem's shape. With few rows, x @ W^T puts the rows on M; the swapped
product puts the weight's rows there and the batch on N (the "swap AB" of small-batch GEMMs). us per call,
Llama-3-8B projection shapes, bf16, CUDA-graph replays of calls over weight copies in rotation (at least 256 MB,
so L2 holds none), against the weight bytes at the copy rate measured in the same run. "swapped" leaves the
transposed view, "swapped+copy" makes it contiguous as a following kernel would need it. "linear+float" is the
LM head as the model computes its float32 logits, "mm_out_float32" the same product written in float32 by the
GEMM itself. Every variant's output is checked against F.linear's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parent))
from limits import copy_bandwidth, graph_call_ms  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


VARIANTS = {"linear": lambda x, w: F.linear(x, w), "swapped": lambda x, w: torch.mm(w, x.t()).t(),
            "swapped+copy": lambda x, w: torch.mm(w, x.t()).t().contiguous(),
            "linear+float": lambda x, w: F.linear(x, w).float(),
            "mm_out_float32": lambda x, w: torch.mm(x, w.t(), out_dtype=torch.float32)}


def time_variants(x: torch.Tensor, weights: list[torch.Tensor]) -> dict[str, float]:
    """us per call of each variant over the weights in rotation, after checking it against F.linear."""
    want = F.linear(x, weights[0]).float()
    out = {}
    for label, fn in VARIANTS.items():
        try:
            err = ((fn(x, weights[0]).float() - want).norm() / want.norm()).item()
        except RuntimeError as exc:  # an overload this torch build lacks
            print(f"{label}: {exc}"[:200], flush=True)
            continue
        assert err < 1e-2, (label, err)
        out[label] = round(graph_call_ms(lambda i, fn=fn: fn(x, weights[i % len(weights)]), 20) * 1e3, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    doc: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    doc.update(copy_bandwidth(2.0))
    bw = doc["copy_gbps"] * 1e9
    rows_out = []
    for name, (n, k) in SHAPES.items():
        copies = max(1, -(-(256 << 20) // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row: dict[str, Any] = {"weight": name, "n": n, "k": k, "rows": m,
                                   "floor_us": round(n * k * 2 / bw * 1e6, 2), **time_variants(x, weights)}
            print(json.dumps(row), flush=True)
            rows_out.append(row)
        del weights
        torch.cuda.empty_cache()
    doc["rows"] = rows_out
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
