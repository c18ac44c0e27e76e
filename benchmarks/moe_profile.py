"""Where one MoE layer's time goes, per kernel: torch.profiler over fused_moe calls of the Qwen3-30B-A3B shape.

    python benchmarks/moe_profile.py [--tokens 1 64] [--calls 50] [--json OUT]

For each token count and each expert format (bf16; 128x128-block fp8 with bf16 activations, W8A16; fp8 with
fp8 activations, W8A8) with the device's tile file: the GPU time per call of every kernel fused_moe launches
(routing sort and padding, activation quantization, the up and down GEMMs, the combine), summed over the calls
and divided by their number, next to the bytes the GEMM kernels must read (the experts the batch routes to).
This says which kernel to work on; moe_kernels.py times the layer as a whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a tree put there wins
sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_kernels import HIDDEN, INTER, layer_inputs  # noqa: E402

from pdlaunch.model.moe.fused import fused_moe, tile_for  # noqa: E402
from pdlaunch.model.quant import fp8  # noqa: E402


def profile_calls(fn: Any, calls: int) -> dict[str, float]:
    """Microseconds per call of each CUDA kernel `fn` launches."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name[:80]] += event.device_time / calls
    return dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))


def profile_size(tokens: int, calls: int) -> list[dict[str, Any]]:
    """Kernel times of one layer at `tokens` tokens with bf16 experts and with 128x128-block fp8 ones."""
    x, w13, w2, weights, ids, routed = layer_inputs(tokens)
    q13, s13 = fp8.quantize_stacked_blocks(w13)
    q2, s2 = fp8.quantize_stacked_blocks(w2)
    fp8_name = "fp8-" + ("w8a8" if tile_for(x, tokens, fp8=True).fp8_activations else "w8a16")
    rows = []
    for name, fn in [("bf16", lambda: fused_moe(x, w13, w2, weights, ids, use="triton", num_experts=w13.shape[0])),
                     (fp8_name, lambda: fused_moe(x, q13, q2, weights, ids, use="triton", scales=(s13, s2),
                                                num_experts=w13.shape[0]))]:
        kernels = profile_calls(fn, calls)
        weight_bytes = routed * 3 * HIDDEN * INTER * (2 if name == "bf16" else 1)
        row = {"tokens": tokens, "experts": name, "experts_routed": routed, "weight_mib": weight_bytes / 2**20,
               "total_us": sum(kernels.values()), "kernels_us": kernels}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [row for tokens in args.tokens for row in profile_size(tokens, args.calls)]
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
