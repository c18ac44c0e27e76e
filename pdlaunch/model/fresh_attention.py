"""Causal attention of a fresh prompt (no cached context), its length padded up to one of a few buckets on CUDA.

Why: torch's SDPA runs a fresh prompt's causal attention on cuDNN on Hopper, and cuDNN builds an execution plan
for every new sequence length: measured on an H200 (8B shape, torch 2.11, `benchmarks/sdpa_fresh_shapes.py`),
32 layers' attention of a length never seen before took 43-46 ms against 3.2 ms once its plan existed, so nearly
every prompt of real traffic (whose lengths rarely repeat) paid ~40 ms of time to first token. Flash attention
builds nothing but ran 2x slower (6.6 ms). Padded to a bucket (a power of two up to 256 tokens, then a multiple of
256), lengths share a few dozen plans that the start-up warm-up builds (`warm_fresh_attention`).

Padding is exact: the padding positions come after every real one, so under the causal mask no real query sees
a padding key; the padding rows' outputs are dropped. It is bounded: fewer than 256 positions (at most 15 below 16
tokens, and below 256 fewer than the prompt's own). Its cost: contiguous copies of q, k and v at the bucket's length
and the attention of the padding rows: a 257-token prompt of the 8B shape (bf16) runs at 512, its q, k, v and output
there ~10 MiB for the call (freed before the next layer), and ~4x that prompt's attention work. The memory profile's
step (runner/kv_cache_tensors.py) runs this same path at the step budget.

cuDNN keys its plans by strides too, so a fresh prompt reaches SDPA in one of two layouts whatever step made its
q/k/v (eager: v a view into the fused qkv output; piecewise: buffers of their own): contiguous when padded, and
`token_major` when its length is a bucket; the warm-up builds both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BUCKET_STEP = 256  # tokens: lengths above it pad to a multiple of it (at most 255 positions more)


def bucket(n: int) -> int:
    """The padded length of an `n`-token fresh prompt: a power of two (at least 16) up to BUCKET_STEP, then
    the next multiple of BUCKET_STEP."""
    if n <= BUCKET_STEP:
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // BUCKET_STEP) * BUCKET_STEP


def buckets(max_len: int) -> list[int]:
    """Every bucket a fresh prompt of at most `max_len` tokens pads to, shortest first."""
    top = bucket(max(1, max_len))
    small = [b for b in (16, 32, 64, 128, 256) if b <= top]
    return small + list(range(2 * BUCKET_STEP, top + 1, BUCKET_STEP))


def token_major(x: torch.Tensor) -> torch.Tensor:
    """x [1, H, n, D] in the layout of model/attention.py's slices of q and k: a contiguous token-major [n, H, D]
    seen as [1, H, n, D] (copied only when x is not already so laid out)."""
    return x[0].transpose(0, 1).contiguous().transpose(0, 1).unsqueeze(0)


def fresh_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           pad: bool | None = None) -> torch.Tensor:
    """q [1, Hq, n, D], k/v [1, Hkv, n, D] -> [1, Hq, n, D], causal. `pad` (default: on CUDA) runs it at the
    bucket's length, in one of the two layouts `warm_fresh_attention` builds."""
    n = q.shape[2]
    padded = bucket(n)
    if not (q.is_cuda if pad is None else pad):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if padded == n:
        # One layout whatever made q/k/v (module docstring): an eager step's v, a view into rows of
        # (Hq + 2 Hkv) * D, is copied; the rest already are so laid out.
        q, k, v = token_major(q), token_major(k), token_major(v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    widths = (0, 0, 0, padded - n)  # the sequence dimension (third of four), padded at its end
    out = F.scaled_dot_product_attention(F.pad(q, widths), F.pad(k, widths), F.pad(v, widths), is_causal=True,
                                         scale=scale, enable_gqa=True)
    return out[:, :, :n]


def warm_fresh_attention(num_heads: int, num_kv_heads: int, head_dim: int, scale: float, dtype: torch.dtype,
                         device: torch.device, max_len: int) -> int:
    """Run the attention once at every bucket up to `max_len` tokens, so a prompt never pays a bucket's plan
    while serving; returns how many buckets ran. Each in both layouts `fresh_causal_attention` brings: padded inputs
    are contiguous, and a prompt whose length is a bucket runs unpadded in `token_major` layout; cuDNN's plans are
    keyed by strides too."""
    sizes = buckets(max_len)
    for n in sizes:
        q = torch.zeros(1, num_heads, n, head_dim, dtype=dtype, device=device)
        kv = torch.zeros(1, num_kv_heads, n, head_dim, dtype=dtype, device=device)
        for layout in (lambda x: x, token_major):
            lq, lkv = layout(q), layout(kv)
            F.scaled_dot_product_attention(lq, lkv, lkv, is_causal=True, scale=scale, enable_gqa=True)
    return len(sizes)
