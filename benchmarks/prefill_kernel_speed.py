"""The paged prefill kernel (model/triton_prefill.py) against the torch path (gathered keys, SDPA) for one layer of
one prompt chunk over its cached context, 8B shape (32 query heads, 8 KV heads, head size 128, bf16, block 16), the
chunk beside 16 decodes as in a mixed step: per call, eager (host included, what a piecewise step pays) and replayed
from a CUDA graph (the GPU's time alone), with the GPU time's TFLOP/s on the attention's FLOPs against the bf16
matmul rate measured in the same run (limits.matmul_rate). `--launches` adds PDLAUNCH_PREFILL_LAUNCH settings
(block_q,block_n,num_warps,num_stages) to time beside the default.
Usage: python benchmarks/prefill_kernel_speed.py [--chunks 128 360 512 1024] [--contexts 0 1024 3072]
       [--launches 32,64,8,2 ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits import graph_call_ms, matmul_rate, time_ms  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a tree put there wins
from pdlaunch.model import attention_plan  # noqa: E402
from pdlaunch.model.attention import paged_attention  # noqa: E402
from pdlaunch.model.attention_metadata import AttentionMetadata  # noqa: E402
from pdlaunch.model.attention_plan import build_group_plan  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK, LAYERS, DECODES, DECODE_CONTEXT = 32, 8, 128, 16, 2, 16, 1024


def _step(chunk: int, context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A cache holding the chunk's sequence and 16 decodes' (scattered blocks), the step's q, k, v and metadata."""
    seqs = [(context, chunk)] + [(DECODE_CONTEXT, 1)] * DECODES
    need = [-(-(c + q) // BLOCK) for c, q in seqs]
    order = torch.randperm(sum(need) + 1)[1:].tolist()  # block 0 unused
    tables, slots = [], []
    for (c, q), n in zip(seqs, need, strict=True):
        blocks, order = order[:n], order[n:]
        tables.append(blocks)
        slots += [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(c, c + q)]
    width = max(need)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device="cuda")
    cache = torch.randn(sum(need) + 1, LAYERS, 2, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    tokens = chunk + DECODES
    q = torch.randn(tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    qlens = [q_ for _, q_ in seqs]
    lens = [c + q_ for c, q_ in seqs]
    starts = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], device="cuda")
    attn = AttentionMetadata(
        query_start_loc=starts, seq_lens=torch.tensor(lens, device="cuda"),
        context_lens=torch.tensor([c for c, _ in seqs], device="cuda"),
        slot_mapping=[torch.tensor(slots, device="cuda")], block_tables=[table], max_query_len=max(qlens),
        max_seq_len=max(lens), query_lens_cpu=qlens, seq_lens_cpu=lens)
    return cache, q, k, v, attn


def _graph_ms(fn: Callable[[], object], calls: int = 20) -> float:
    """Per call from a CUDA graph of `calls` calls (limits.graph_call_ms); NaN where the call cannot be captured."""
    try:
        return graph_call_ms(lambda _: fn(), calls)
    except RuntimeError as exc:
        print(f"(not captured: {str(exc).splitlines()[0]})", flush=True)
        return float("nan")


def measure(chunk: int, context: int, setting: str, matmul_tflops: float) -> dict[str, object]:
    """One layer's attention of the step under one setting: `torch`, or a launch for the kernel ('' = default)."""
    cache, q, k, v, attn = _step(chunk, context)
    attention_plan.PAGED_PREFILL_MAX_TOKENS = 1 << 20  # the kernel at every chunk size, past the engine's limit
    if setting == "torch":
        os.environ["PDLAUNCH_PAGED_PREFILL"] = "torch"
    else:
        os.environ["PDLAUNCH_PAGED_PREFILL"] = "auto"
        os.environ["PDLAUNCH_PREFILL_LAUNCH"] = setting
    try:
        plan = build_group_plan(attn, 0, cache, None)
        if (plan.prefill_tiles is not None) == (setting == "torch"):
            raise SystemExit(f"{chunk} tokens over {context}: the plan did not take the {setting or 'kernel'} path")
        out = torch.empty_like(q)

        def call() -> object:
            return paged_attention(q, k, v, cache, 1, plan, HEAD_DIM**-0.5, out=out)

        eager, replay = time_ms(call), _graph_ms(call)
    finally:
        os.environ.pop("PDLAUNCH_PREFILL_LAUNCH", None)
        os.environ.pop("PDLAUNCH_PAGED_PREFILL", None)
    # Causal: the chunk's queries see context + their own position's keys (half the chunk's square on average).
    flops = 4 * HEADS * HEAD_DIM * chunk * (context + (chunk + 1) / 2)
    tflops = flops / (replay * 1e-3) / 1e12
    return {"chunk": chunk, "context": context, "setting": setting or "kernel", "eager_ms": eager,
            "gpu_ms": replay, "tflops": tflops, "of_matmul": tflops / matmul_tflops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 360, 512, 1024])
    parser.add_argument("--contexts", type=int, nargs="+", default=[0, 1024, 3072])
    parser.add_argument("--launches", nargs="*", default=[], help="PDLAUNCH_PREFILL_LAUNCH settings to add")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    torch.manual_seed(0)
    ceiling = matmul_rate(8192)
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {ceiling['matmul_tflops']:.0f} TFLOP/s (8192^3, this run)")
    rows = []
    print("| chunk | context | setting | eager ms | GPU ms | TFLOP/s | of matmul |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for chunk in args.chunks:
        for context in args.contexts:
            for setting in ["torch", "", *args.launches]:
                row = measure(chunk, context, setting, ceiling["matmul_tflops"])
                rows.append(row)
                print(f"| {chunk} | {context} | {row['setting']} | {row['eager_ms']:.3f} | {row['gpu_ms']:.3f} | "
                      f"{row['tflops']:.0f} | {row['of_matmul']:.0%} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "matmul": ceiling, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
