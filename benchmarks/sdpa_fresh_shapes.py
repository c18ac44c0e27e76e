"""What a prompt length never seen before costs torch's attention backends: causal GQA attention (8B shape: 32 query
heads, 8 KV heads, head dim 128, bf16) over N distinct lengths, each timed on its first call and again on a second
call, for one SDPA backend per fresh process (so no backend's per-shape cache is warm from another's run).

    python benchmarks/sdpa_fresh_shapes.py [--lengths 40] [--json OUT]
        [--backends cudnn,flash,efficient,default,bucketed]

A fresh prompt (no cached context) runs through `F.scaled_dot_product_attention` (model/attention.py) on every
layer; a backend that builds a plan per new shape pays it in the first step of every new prompt length.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time


def _one(backend: str, lengths: list[int]) -> dict[str, object]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pdlaunch.model.fresh_attention import fresh_causal_attention, warm_fresh_attention

    chosen = {"cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION],
              "efficient": [SDPBackend.EFFICIENT_ATTENTION], "default": None, "bucketed": None}[backend]
    dev = torch.device("cuda")
    warm_ms = 0.0

    def call(n: int) -> float:
        q = torch.randn(1, 32, n, 128, device=dev, dtype=torch.bfloat16)
        kv = torch.randn(2, 1, 8, n, 128, device=dev, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(32):  # one call a layer, as a step makes them
            if backend == "bucketed":
                fresh_causal_attention(q, kv[0], kv[1], 128**-0.5)
            elif chosen is None:
                F.scaled_dot_product_attention(q, kv[0], kv[1], is_causal=True, enable_gqa=True)
            else:
                with sdpa_kernel(chosen):
                    F.scaled_dot_product_attention(q, kv[0], kv[1], is_causal=True, enable_gqa=True)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    call(64)  # the backend's libraries loaded
    if backend == "bucketed":  # what the start-up warm-up does (runner/dry_steps.py)
        start = time.perf_counter()
        warm_fresh_attention(32, 8, 128, 128**-0.5, torch.bfloat16, dev, 4096)
        torch.cuda.synchronize()
        warm_ms = (time.perf_counter() - start) * 1e3
    first = [call(n) for n in lengths]
    second = [call(n) for n in lengths]
    return {"backend": backend, "first_ms": first, "second_ms": second, "warm_up_ms": warm_ms}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, default=40)
    ap.add_argument("--backends", default="cudnn,flash,efficient,default")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = random.Random(0).sample(range(100, 4096), args.lengths)
    if args.child:
        print(json.dumps(_one(args.child, lengths)))
        return
    rows = []
    for backend in args.backends.split(","):
        proc = subprocess.run([sys.executable, __file__, "--lengths", str(args.lengths), "--child", backend],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            print(f"{backend}: failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        f, s = row["first_ms"], row["second_ms"]
        print(f"{backend:10s} 32 calls at a new length: median {statistics.median(f):8.2f} ms, max {max(f):8.1f}, "
              f"sum {sum(f):8.0f} ms | again: median {statistics.median(s):6.2f} ms, sum {sum(s):6.0f} ms"
              + (f" | warm-up {row['warm_up_ms']:.0f} ms" if row["warm_up_ms"] else ""))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"lengths": lengths, "rows": rows}, out)


if __name__ == "__main__":
    main()
