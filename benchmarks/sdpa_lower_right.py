"""Attention of a prefill chunk over its cached context (8B shape: 32 query heads, 8 KV heads, head size 128,
bf16): SDPA with a boolean causal mask against torch's causal_lower_right bias, per call.
Usage: python benchmarks/sdpa_lower_right.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def per_call_ms(fn: Callable[[], torch.Tensor], calls: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def measure(ctx: int, chunk: int) -> None:
    keys = ctx + chunk
    q = torch.randn(1, 32, chunk, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, keys, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.arange(keys, device="cuda")[None, :] <= (ctx + torch.arange(chunk, device="cuda"))[:, None]
    bias = causal_lower_right(chunk, keys)

    def boolean() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def lower_right() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)

    a, b = boolean().float(), lower_right().float()
    diff = ((a - b).norm() / a.norm()).item()
    flops = 4 * 32 * 128 * (chunk * ctx + chunk * chunk / 2)
    tb, tc = per_call_ms(boolean), per_call_ms(lower_right)
    print(f"context {ctx} chunk {chunk}: boolean mask {tb * 1e3:.0f} us ({flops / tb / 1e9:.0f} TFLOP/s), "
          f"causal_lower_right {tc * 1e3:.0f} us ({flops / tc / 1e9:.0f} TFLOP/s), relative difference {diff:.2e}",
          flush=True)


def main() -> None:
    for ctx, chunk in [(2560, 512), (0, 512), (7680, 512), (1024, 2048)]:
        measure(ctx, chunk)


if __name__ == "__main__":
    main()
