"""The hardware ceilings that issue-9 targets are ratios against, measured on this GPU, this run.

    python benchmarks/limits.py [--json OUT.json] [--copy-gib 2] [--matmul-n 8192]

Measures (CUDA events, warm-up first, median of repeats, random data, never zeros):
- device-to-device copy bandwidth, counting bytes read + bytes written (2 x buffer / time), the
  rate at which memory can be streamed; `copy_gbps_buffer` is buffer / time (half of it), the
  convention of the docs/ARCHITECTURE.md "Measured facts" table (H100 1496 GB/s there = about 3.0 TB/s here);
- bf16 matrix product rate of an n x n x n GEMM (TFLOP/s);
- peer copy bandwidth cuda:0 -> cuda:1, buffer / time, when there are two GPUs;
and derives the floors for the Llama-3-8B shape (bf16):
- decode batch 1: weight bytes / copy bandwidth (the target allows 1.25x this);
- prefill 4096 tokens: model FLOPs / matmul rate (the target asks for >= 60% of this rate);
- KV of an 8k-token request: bytes / peer copy (>= 80% target), bytes / copy (H100, >= 50%).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a tree put there wins
from pdlaunch.bench.checkpoint_shapes import LLAMA3_8B, tensor_shapes  # noqa: E402

BF16_BYTES = 2


def time_ms(fn: Callable[[], Any], warmup: int = 3, repeat: int = 20) -> float:
    """Median milliseconds of `fn` on the current stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_call_ms(fn: Callable[[int], Any], calls: int) -> float:
    """Median milliseconds of one of `calls` calls fn(0), fn(1), ... captured in one CUDA graph (as an engine
    step replays kernels), the first call made outside the capture so that compiles happen there. The index
    lets a caller rotate its inputs, so that L2 does not hold what the next call reads."""
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    return time_ms(graph.replay, warmup=2, repeat=10) / calls


def launch_checks(fn: Callable[[], torch.Tensor], want: torch.Tensor, label: str) -> bool:
    """A sweep's launch before it is timed: False (and a line saying why) when it does not run on this GPU (past the
    SM's shared memory), else asserts fn()'s result within 1e-2 relative error of `want` (float32) and returns True."""
    try:
        got = fn().float()
        torch.cuda.synchronize()
    except Exception as exc:  # a launch past the SM's shared memory
        print(f"{label}: {type(exc).__name__}", flush=True)
        return False
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-2, (label, err)
    return True


def untuned_fp8_gemv() -> None:
    """The block-FP8 GEMV as before its per-shape launches and the fold rule: GEMV_CONFIG for every weight, scales
    never folded into x (`block_gemv.gemv_launch` replaced), for A/B runs in one call (decode_grid.py, moe_speed.py
    --no-gemv-fold)."""
    import pdlaunch.model.quant.block_gemv as block_gemv

    block_gemv.gemv_launch = lambda name, n, k: (block_gemv.GEMV_CONFIG, False)  # type: ignore[assignment]


ARGMAX_VARIANTS = ("graph", "rows", "torch")


def argmax_variant(name: str) -> None:
    """Where a decode step's greedy argmax runs, for A/B runs in one call (decode_grid.py, moe_speed.py --argmax):
    "graph" as shipped (inside the decode graph, `fused_ops.argmax_rows`); "rows": after the replay, in the
    sampler, with `argmax_rows`; "torch": after the replay with torch's `argmax(dim=-1)` (before both)."""
    import pdlaunch.engine.sampler as sampler
    import pdlaunch.runner.cuda_graphs as cuda_graphs

    if name == "graph":
        return
    cuda_graphs.argmax_rows = lambda logits: torch.empty(0, dtype=torch.long, device=logits.device)  # type: ignore[assignment]
    sample_ids = sampler.Sampler.sample_ids
    sampler.Sampler.sample_ids = (  # type: ignore[method-assign]
        lambda self, logits, rows, argmax=None: sample_ids(self, logits, rows, None))
    if name == "torch":
        sampler.argmax_rows = lambda logits: logits.argmax(dim=-1)  # type: ignore[attr-defined]


def bf16_logits() -> None:
    """The LM head as before its float32 output: the product in the weight's dtype, then `.float()` (a second
    launch), for A/B runs in one call (decode_grid.py --bf16-logits)."""
    import torch.nn.functional as F

    from pdlaunch.model.gemv import gemv, gemv_available
    from pdlaunch.model.vocab_parallel import ParallelLMHead

    def product_then_float(self: ParallelLMHead, hidden: torch.Tensor) -> torch.Tensor:
        on_gemv = gemv_available(hidden, self.weight)
        return (gemv(hidden, self.weight) if on_gemv else F.linear(hidden, self.weight)).float()

    ParallelLMHead._float32_logits = product_then_float  # type: ignore[method-assign]


def decode_gemm_table(sweep_json: Path, margin: float = 0.0, merge: bool = False) -> dict[str, Any]:
    """Install, for this process, a decode-GEMM table (model/decode_gemm.py DECODE_GEMM_DEVICE_CONFIGS) made from a
    benchmarks/decode_gemm_speed.py run: per swept shape and row count, its fastest launch where that beat cuBLAS by
    more than `margin` (a fraction), else cuBLAS; for A/B runs before a table is committed (decode_grid.py
    --decode-gemm-table). Entries are ordered by rows, then N, then K, so each swept shape takes its own; other
    shapes take the first entry that covers them. `merge`: the committed table's entries for this device stay,
    except those the sweep has (the same rows and shape). Returns the table."""
    import pdlaunch.model.decode_gemm as decode_gemm

    doc = json.loads(sweep_json.read_text())
    device = doc["device"].replace("NVIDIA ", "")
    entries = []
    for row in doc["rows"]:
        config = None
        if row.get("best_us") is not None and row["best_us"] < row["cublas_us"] * (1 - margin):
            config = tuple(int(v) for v in row["best"].strip("()").split(","))
            config += (0,) * (7 - len(config))  # a sweep before the TMA flag: the pointer kernel
        entries.append((row["rows"], row["n"], row["k"], config))
    if merge:
        swept = {entry[:3] for entry in entries}
        committed = next((t for key, t in decode_gemm.DECODE_GEMM_DEVICE_CONFIGS.items() if key in device), ())
        entries += [entry for entry in committed if entry[:3] not in swept]
    table = {device: tuple(sorted(entries, key=lambda e: e[:3]))}
    decode_gemm.DECODE_GEMM_DEVICE_CONFIGS = table  # type: ignore[assignment]
    return table


def fill_kv_caches(caches: list[torch.Tensor]) -> None:
    """Random values in every KV cache (any dtype: fp8 has no normal_(), so draw in bf16 and cast, 256 blocks
    at a time to bound the temporary)."""
    for cache in caches:
        for rows in cache.split(256):
            rows.copy_(torch.randn(rows.shape, device=rows.device, dtype=torch.bfloat16).clamp_(-4, 4))


def copy_bandwidth(gib: float) -> dict[str, float]:
    n = int(gib * 2**30) // 4
    src = torch.rand(n, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    if not torch.equal(dst[:1024], src[:1024]) or not torch.equal(dst[-1024:], src[-1024:]):
        raise RuntimeError("device copy produced wrong data")
    nbytes = n * 4
    return {"copy_ms": ms, "copy_gbps": 2 * nbytes / ms / 1e6, "copy_gbps_buffer": nbytes / ms / 1e6}


def matmul_rate(n: int) -> dict[str, float]:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: torch.mm(a, b, out=out), warmup=5)
    ref = a[:64].double() @ b.double()
    err = ((out[:64].double() - ref).norm() / ref.norm()).item()
    if not err < 1e-2:
        raise RuntimeError(f"bf16 matmul relative error {err:.2e}")
    return {"matmul_n": n, "matmul_ms": ms, "matmul_tflops": 2 * n**3 / ms / 1e9}


def peer_bandwidth(gib: float, repeat: int = 20) -> dict[str, Any]:
    """cuda:0 -> cuda:1, buffer / time. A copy between devices synchronises both, so time it with
    the host clock around synchronised loops rather than with one device's events."""
    if torch.cuda.device_count() < 2:
        return {}
    n = int(gib * 2**30) // 4
    src = torch.rand(n, device="cuda:0")
    dst = torch.empty(n, device="cuda:1")
    times = []
    for i in range(repeat + 3):
        for d in range(2):
            torch.cuda.synchronize(d)
        t0 = time.perf_counter()
        dst.copy_(src)
        for d in range(2):
            torch.cuda.synchronize(d)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    if not torch.equal(dst[:1024].cpu(), src[:1024].cpu()):
        raise RuntimeError("peer copy produced wrong data")
    ms = statistics.median(times)
    return {"peer_ms": ms, "peer_gbps": n * 4 / ms / 1e6, "peer_access": torch.cuda.can_device_access_peer(0, 1)}


def llama3_8b_figures(prefill_tokens: int = 4096, kv_tokens: int = 8192) -> dict[str, float]:
    """Weight bytes (all tensors, bf16), prefill FLOPs (linear layers + causal attention; logits of the
    last token only), KV-cache bytes of `kv_tokens` tokens."""
    cfg = {**LLAMA3_8B, "head_dim": LLAMA3_8B["hidden_size"] // LLAMA3_8B["num_attention_heads"]}
    shapes = dict(tensor_shapes(cfg))
    weight_bytes = sum(math.prod(s) for s in shapes.values()) * BF16_BYTES
    layer_linear = sum(math.prod(s) for name, s in shapes.items() if name.endswith("proj.weight"))
    h, layers, t = cfg["hidden_size"], cfg["num_hidden_layers"], prefill_tokens
    linear_flops = 2 * layer_linear * t
    attn_flops = 2 * t * t * h * layers  # QK^T + PV = 4 t^2 h per layer, halved by the causal mask
    logits_flops = 2 * h * cfg["vocab_size"]
    kv_per_token = layers * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * BF16_BYTES
    return {
        "weight_bytes": weight_bytes,
        "prefill_tokens": t,
        "prefill_flops": linear_flops + attn_flops + logits_flops,
        "kv_tokens": kv_tokens,
        "kv_bytes": kv_per_token * kv_tokens,
    }


def measure(copy_gib: float, matmul_n: int) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/limits.py needs a CUDA device")
    props = torch.cuda.get_device_properties(0)
    doc: dict[str, Any] = {"device": props.name, "gpus": torch.cuda.device_count(), "torch": torch.__version__}
    doc.update(copy_bandwidth(copy_gib))
    doc.update(matmul_rate(matmul_n))
    doc.update(peer_bandwidth(copy_gib))
    m = llama3_8b_figures()
    doc.update(m)
    doc["decode_floor_ms"] = m["weight_bytes"] / doc["copy_gbps"] / 1e6
    doc["decode_target_ms"] = 1.25 * doc["decode_floor_ms"]
    doc["prefill_floor_ms"] = m["prefill_flops"] / doc["matmul_tflops"] / 1e9
    doc["prefill_target_ms"] = doc["prefill_floor_ms"] / 0.6
    doc["kv_copy_floor_ms"] = m["kv_bytes"] / doc["copy_gbps_buffer"] / 1e6
    if "peer_gbps" in doc:
        doc["kv_peer_floor_ms"] = m["kv_bytes"] / doc["peer_gbps"] / 1e6
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--copy-gib", type=float, default=2.0, help="copy buffer size (GiB), well above L2")
    parser.add_argument("--matmul-n", type=int, default=8192)
    args = parser.parse_args()
    doc = measure(args.copy_gib, args.matmul_n)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"device: {doc['device']} x{doc['gpus']} (torch {doc['torch']})")
    print(f"d2d copy: {doc['copy_gbps']:.0f} GB/s read+write ({doc['copy_gbps_buffer']:.0f} GB/s buffer/time)")
    print(f"bf16 matmul {doc['matmul_n']}^3: {doc['matmul_tflops']:.0f} TFLOP/s")
    if "peer_gbps" in doc:
        print(f"peer copy 0->1: {doc['peer_gbps']:.0f} GB/s (peer access {doc['peer_access']})")
    print(f"Llama-3-8B bf16 weights {doc['weight_bytes'] / 1e9:.2f} GB: decode floor {doc['decode_floor_ms']:.2f} ms, "
          f"target <= {doc['decode_target_ms']:.2f} ms")
    print(f"prefill {doc['prefill_tokens']} tokens = {doc['prefill_flops'] / 1e12:.1f} TFLOP: floor "
          f"{doc['prefill_floor_ms']:.1f} ms, target <= {doc['prefill_target_ms']:.1f} ms")
    line = (f"KV of {doc['kv_tokens']} tokens {doc['kv_bytes'] / 2**30:.2f} GiB: "
            f"d2d copy {doc['kv_copy_floor_ms']:.2f} ms")
    if "kv_peer_floor_ms" in doc:
        line += f", peer copy {doc['kv_peer_floor_ms']:.2f} ms"
    print(line)


if __name__ == "__main__":
    main()
