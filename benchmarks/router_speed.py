"""The MoE router's product (hidden -> experts) at decode batch sizes: the Triton launch of
`router_logits` against cuBLAS (F.linear), each replayed from a CUDA graph of 20 calls, per call.

Usage: python benchmarks/router_speed.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from limits import time_ms

from pdlaunch.model.moe.router import router_logits

SHAPES = {"qwen3-30b-a3b": (128, 2048), "mixtral-8x7b": (8, 4096), "olmoe": (64, 2048)}


def graphed(fn: Any, calls: int = 20) -> Any:
    fn()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for name, (experts, hidden) in SHAPES.items():
        w = torch.randn(experts, hidden, device="cuda", dtype=torch.bfloat16) * hidden**-0.5
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
            triton_us = time_ms(graphed(lambda x=x, w=w: router_logits(x, w))) * 1e3 / 20
            cublas_us = time_ms(graphed(lambda x=x, w=w: F.linear(x, w))) * 1e3 / 20
            err = (router_logits(x, w).float() - F.linear(x.float(), w.float())).abs().max().item()
            rows.append({"shape": name, "tokens": tokens, "router_logits_us": triton_us, "cublas_us": cublas_us,
                         "max_abs_err": err})
            print(f"{name:14s} {tokens:4d} tokens: router_logits {triton_us:6.2f} us, cuBLAS {cublas_us:6.2f} us, "
                  f"max |err| {err:.3g}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
