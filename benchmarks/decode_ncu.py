"""One paged-decode launch to read under Nsight Compute (hardware counters; Firecracker GPU hosts).

    ncu --clock-control none -k regex:paged_decode --launch-skip 3 --launch-count 1 --set full \\
        python benchmarks/decode_ncu.py --kv-heads 4 --heads 32 --cell 64x1024 --kv-cache-dtype fp8

A random one-layer cache (bf16 or e4m3), the engine's `paged_decode` with `choose_launch`'s launch, four calls
(three to compile and warm up, the fourth for the profiler), each over its own blocks (nothing from L2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from pdlaunch.model.triton_decode import paged_decode  # noqa: E402

BLOCK_SIZE = 16
HEAD_DIM = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--cell", default="64x1024")
    parser.add_argument("--kv-cache-dtype", default="fp8", choices=["fp8", "bf16"])
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    batch, context = (int(x) for x in args.cell.split("x"))
    per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * per_seq * args.calls
    cache = torch.randn(num_blocks, 1, 2, BLOCK_SIZE, args.kv_heads, HEAD_DIM, device="cuda") * 0.5
    cache = cache.to(torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else torch.bfloat16)
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(args.calls, batch, per_seq)
    q = torch.randn(batch, args.heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    tokens = torch.arange(batch, device="cuda")
    for i in range(args.calls):
        out = paged_decode(q, cache, 0, tokens, tables[i], lens, None, HEAD_DIM**-0.5)
    torch.cuda.synchronize()
    print(args.cell, args.kv_cache_dtype, "kv heads", args.kv_heads, "out norm", out.float().norm().item())


if __name__ == "__main__":
    main()
