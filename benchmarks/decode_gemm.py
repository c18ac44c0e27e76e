"""Decode GEMMs of the Llama-3-8B shape at small batch: which formulation streams the weights fastest.

    python benchmarks/decode_gemm.py [--batch 1 8 16 32 64 128] [--json OUT]

y = x W^T for x [M, K] and each projection's W [N, K] (bf16), timed as replays of a CUDA graph of
calls that cycle through enough weight copies to defeat the 50 MB L2, against the copy bandwidth
measured in the same run: `linear` (F.linear, what the model runs), `w_x` (W @ x^T, transposed
back: cuBLAS sees the other operand order), `x_wt` (x @ W^T with W^T stored contiguous [K, N]).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits import copy_bandwidth, time_ms  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
LAYERS = {"qkv": 32, "o": 32, "gate_up": 32, "down": 32, "lm_head": 1}
CALLS = 12


def variants(weights: list[torch.Tensor], transposed: list[torch.Tensor]) -> dict[str, Callable[..., torch.Tensor]]:
    return {
        "linear": lambda x, i: F.linear(x, weights[i]),
        "w_x": lambda x, i: (weights[i] @ x.t()).t(),
        "x_wt": lambda x, i: x @ transposed[i],
    }


def graph_ms(fn: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, copies: int) -> float:
    for i in range(copies):
        fn(x, i)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(x, i % copies)
    return time_ms(graph.replay, warmup=2, repeat=10) / CALLS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    doc: dict[str, Any] = {"device": torch.cuda.get_device_name(0), **copy_bandwidth(2.0), "rows": []}
    bw = doc["copy_gbps"] * 1e9
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(2, -(-200 * 2**20 // nbytes) + 1)
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(copies)]
        transposed = [w.t().contiguous() for w in weights]
        for m in args.batch:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = F.linear(x, weights[0]).float()
            row: dict[str, Any] = {"proj": name, "m": m}
            for label, fn in variants(weights, transposed).items():
                err = ((fn(x, 0).float() - want).norm() / want.norm()).item()
                if not err < 1e-2:
                    raise RuntimeError(f"{label} {name} m={m}: relative error {err:.1e}")
                ms = graph_ms(fn, x, copies)
                row[f"{label}_us"] = ms * 1e3
                row[f"{label}_of_copy"] = nbytes / (ms * 1e-3) / bw
            doc["rows"].append(row)
            print(f"{name:8s} m={m:4d} " + " ".join(f"{label} {row[f'{label}_us']:7.1f} us "
                                                  f"({100 * row[f'{label}_of_copy']:3.0f}%)"
                                                  for label in variants(weights, transposed)), flush=True)
        del weights, transposed
        torch.cuda.empty_cache()
    for m in args.batch:  # per decode step: every layer's projections and the lm_head
        rows = [r for r in doc["rows"] if r["m"] == m]
        total = {label: sum(LAYERS[r["proj"]] * r[f"{label}_us"] for r in rows) / 1e3 for label in ("linear", "w_x")}
        best = sum(LAYERS[r["proj"]] * min(r["linear_us"], r["w_x_us"], r["x_wt_us"]) for r in rows) / 1e3
        floor = sum(LAYERS[p] * n * k * 2 for p, (n, k) in SHAPES.items()) / bw * 1e3
        print(f"m={m:4d}: GEMMs per step linear {total['linear']:.2f} ms, w_x {total['w_x']:.2f} ms, "
              f"best of three per shape {best:.2f} ms, weight floor {floor:.2f} ms", flush=True)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
