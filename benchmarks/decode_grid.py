"""Decode speed on a batch x context grid against the memory floor, in one run (issue 15).

    python benchmarks/decode_grid.py CKPT [--batch 1 8 32 64 128] [--context 128 1024 4096 16384]
        [--steps 16] [--json OUT] [--baseline-kernel OLD_triton_decode.py] [--sweep]

One process: the copy bandwidth (benchmarks/limits.py: read + write), then an in-process engine
(bf16, CUDA graphs, prefix caching off) whose prompts' KV is taken as already there
(benchmarks/ready_kv.py: the blocks hold random values written once), so every cell is decode
steps only. For each batch x context that fits in the cache:

- step: median wall time of `engine.step()` over `--steps` steps with every sequence decoding
  (scheduler, input staging, graph replay, sampling, detokenizing); replay: the captured graph
  alone (GPU time);
- floor: (weight bytes + KV bytes the step reads) / copy bandwidth; ratio = step / floor;
- attention: the paged decode kernel alone on one layer of this batch x context (replays of a
  CUDA graph of 10 calls, as the engine runs it: no launch gaps), KV bytes read / time, against
  the copy bandwidth (the same convention as the floor).

`--baseline-kernel FILE` also times another triton_decode.py (e.g. the previous version) on the
same cells; `--sweep` times kernel launch configurations on a few cells (benchmarks/decode_sweep.py).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import json
import os
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits import (  # noqa: E402
    ARGMAX_VARIANTS,
    argmax_variant,
    bf16_logits,
    copy_bandwidth,
    decode_gemm_table,
    fill_kv_caches,
    graph_call_ms,
    time_ms,
    untuned_fp8_gemv,
)
from ready_kv import ReadyKVConnector  # noqa: E402

from pdlaunch.engine.llm import build_config  # noqa: E402
from pdlaunch.engine.llm_engine import LLMEngine  # noqa: E402
from pdlaunch.engine.outputs import SamplingParams  # noqa: E402
from pdlaunch.model import decode_launch, triton_decode  # noqa: E402

WARMUP_STEPS = 4  # connector hand-off and first replays
TRACE_STEPS = 12  # `--step-trace`: engine steps traced after the timed ones
GRAPH_CALLS = 10
rng = random.Random(0)


def load_kernel_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_triton_decode", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class KernelBench:
    """Times one paged_decode call (layer 0) over the engine's cache at a batch x context."""

    def __init__(self, engine: LLMEngine) -> None:
        self.cache = engine.runner.kv_caches[0]
        arch = engine.checkpoint.arch
        self.num_heads, self.head_dim = arch.num_heads, arch.head_dim
        _, _, _, self.block_size, self.num_kv_heads, _ = self.cache.shape

    def inputs(self, batch: int, context: int, sets: int = 1) -> tuple[torch.Tensor, ...]:
        """q, tokens, block tables [sets, batch, blocks] over disjoint blocks, lengths."""
        dev = self.cache.device
        per_seq = -(-context // self.block_size)
        blocks = torch.randperm(self.cache.shape[0], device=dev)[:sets * batch * per_seq].view(sets, batch, per_seq)
        q_dtype = torch.bfloat16 if self.cache.element_size() == 1 else self.cache.dtype  # fp8 cache: bf16 queries
        q = torch.randn(batch, self.num_heads, self.head_dim, device=dev, dtype=q_dtype)
        lens = torch.full((batch,), context, dtype=torch.long, device=dev)
        return q, torch.arange(batch, device=dev), blocks, lens

    def cold_sets(self, batch: int, context: int) -> int:
        """Block sets to rotate through so the calls of one graph read more KV than L2 holds (in a decode
        step the weights stream between two layers' attention, so no layer finds its KV in L2): a small cell
        timed over one set reads L2, not memory."""
        l2 = torch.cuda.get_device_properties(self.cache.device).L2_cache_size
        per_seq = -(-context // self.block_size)
        fit = self.cache.shape[0] // (batch * per_seq)
        return max(1, min(GRAPH_CALLS, fit, -(-4 * l2 // max(1, self.kv_bytes(batch, context)))))

    def kv_bytes(self, batch: int, context: int) -> int:
        return batch * context * self.num_kv_heads * self.head_dim * 2 * self.cache.element_size()

    def time(self, decode: Callable[..., torch.Tensor], batch: int, context: int, **kw: Any) -> float:
        """Milliseconds per call, as in the engine: replays of a CUDA graph of GRAPH_CALLS calls, each over
        other blocks than the last (`cold_sets`)."""
        q, tokens, tables, lens = self.inputs(batch, context, self.cold_sets(batch, context))
        scale = self.head_dim**-0.5
        return graph_call_ms(
            lambda i: decode(q, self.cache, 0, tokens, tables[i % tables.shape[0]], lens, None, scale, **kw),
            GRAPH_CALLS)

    def check(self, batch: int, context: int, launch: decode_launch.DecodeLaunch | None = None) -> float:
        """Relative error of the kernel against float64 attention over the same keys."""
        q, tokens, tables, lens = self.inputs(min(batch, 4), context)
        table = tables[0]
        extra = {} if launch is None else {"launch": launch}
        got = triton_decode.paged_decode(q, self.cache, 0, tokens, table, lens, None, self.head_dim**-0.5, **extra)
        pos = torch.arange(context, device=q.device)
        rows = table[:, pos // self.block_size]  # [S, C]
        k = self.cache[rows, 0, 0, pos % self.block_size].double()  # [S, C, Hkv, D]
        v = self.cache[rows, 0, 1, pos % self.block_size].double()
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
        s = torch.einsum("shd,schd->shc", q.double(), k) * self.head_dim**-0.5
        want = torch.einsum("shc,schd->shd", s.softmax(-1), v)
        return ((got.double() - want).norm() / want.norm()).item()


def step_timeline(engine: LLMEngine, steps: int) -> dict[str, Any]:
    """The GPU's timeline over `steps` engine steps (torch.profiler, CUDA activity): per step, the span from the
    first kernel or copy to the last, the time something ran, the idle gaps between them by the pair of names
    around each gap, and every kernel or copy name with its count and time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end, e.name[:70]) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, gaps, names = 0.0, {}, {}
    end, last = spans[0][0], ""
    for start, stop, name in spans:
        if start > end + 0.5:  # an idle gap longer than half a microsecond
            key = f"{last} -> {name}"
            gaps[key] = gaps.get(key, 0.0) + (start - end) / steps
        busy += max(0.0, stop - max(start, end))
        end, last = max(end, stop), name
        count, us = names.get(name, (0.0, 0.0))
        names[name] = (count + 1 / steps, us + (stop - start) / steps)
    return {"span_us": (end - spans[0][0]) / steps, "busy_us": busy / steps,
            "idle_gaps_us": dict(sorted(gaps.items(), key=lambda kv: -kv[1])[:20]),
            "names": {n: {"per_step": round(c, 2), "us": round(u, 2)}
                      for n, (c, u) in sorted(names.items(), key=lambda kv: -kv[1][1])[:40]}}


def engine_cell(engine: LLMEngine, batch: int, context: int, steps: int, host_profile: bool,
                kernel_profile: bool = False, trace: bool = False) -> dict[str, Any]:
    traced = TRACE_STEPS if trace else 0
    params = SamplingParams(max_tokens=steps + WARMUP_STEPS + traced, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"g{batch}x{context}-{i}", [rng.randrange(1000, 100000) for _ in range(context)], params)
    times = []
    profiler = cProfile.Profile() if host_profile else None
    while engine.has_unfinished_requests() and len(times) < WARMUP_STEPS + steps:
        if profiler is not None and len(times) == WARMUP_STEPS:
            profiler.enable()
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    decode = times[WARMUP_STEPS:]
    out: dict[str, Any] = {"step_ms": statistics.median(decode) * 1e3, "steps": len(decode)}
    if trace:
        out["timeline"] = step_timeline(engine, traced - 2)  # the last steps finish requests: not traced
        print(json.dumps({"cell": f"{batch}x{context}", "timeline": out["timeline"]}, indent=1), flush=True)
        while engine.has_unfinished_requests():
            engine.step()
    if profiler is not None:  # where the host time of the steps goes (the GPU wait shows as tolist)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
        out["host_profile"] = text.getvalue()
        print(text.getvalue(), flush=True)
    graphs = engine.runner.graphs
    if graphs is not None and batch in graphs.graphs:  # the last inputs are still in its buffers
        out["replay_ms"] = time_ms(graphs.graphs[batch][0].replay)
        if kernel_profile:  # GPU time of each kernel of one replayed step, microseconds
            from moe_profile import profile_calls

            kernels = profile_calls(graphs.graphs[batch][0].replay, 20)
            out["kernels_us"] = {name: round(us, 2) for name, us in list(kernels.items())[:30]}
            out["kernels_total_us"] = sum(kernels.values())
            print(json.dumps({"cell": f"{batch}x{context}", "kernels_total_us": out["kernels_total_us"],
                              "kernels_us": out["kernels_us"]}, indent=1), flush=True)
    return out


def fits(engine: LLMEngine, batch: int, context: int, steps: int) -> bool:
    bs = engine.block_size
    extra = WARMUP_STEPS + TRACE_STEPS + 1
    return (context + steps + extra <= engine.max_model_len
            and batch * -(-(context + steps + extra) // bs) <= engine.block_manager.num_blocks)


def run_grid(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    grid = [(b, c) for c in args.context for b in args.batch]
    grid += [(int(b), int(c)) for b, c in (cell.split("x") for cell in args.cells)]
    config = build_config(args.checkpoint, "cuda", "bfloat16", {
        "max_num_seqs": max(b for b, _ in grid), "max_num_batched_tokens": 8192, "enable_prefix_caching": False,
        "max_model_len": max(c for _, c in grid) + args.steps + TRACE_STEPS + 64,
        "gpu_memory_utilization": args.gpu_memory_utilization, "async_scheduling": args.async_scheduling,
        "kv_cache_dtype": args.kv_cache_dtype})
    engine = LLMEngine(config, connector=ReadyKVConnector())
    try:
        fill_kv_caches(engine.runner.kv_caches)  # never time reads of zeros
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
        arch = engine.checkpoint.arch
        element_size = engine.runner.kv_caches[0].element_size()
        kv_per_token = arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * element_size
        doc.update(weight_bytes=weight_bytes, kv_bytes_per_token=kv_per_token,
                   num_kv_blocks=engine.block_manager.num_blocks, cuda_graphs=engine.runner.graphs is not None,
                   block_size=engine.block_size)
        bench = KernelBench(engine)
        baseline = load_kernel_module(args.baseline_kernel) if args.baseline_kernel else None
        bw = doc["copy_gbps"] * 1e9
        if args.sweep:
            from decode_sweep import sweep
            doc["sweep"] = sweep(bench, bw, [(int(b), int(c)) for b, c in (x.split("x") for x in args.sweep_cells)])
        cells = []
        for batch, context in grid:
            if not fits(engine, batch, context, args.steps):
                cells.append({"batch": batch, "context": context, "skipped": "does not fit the KV cache"})
                continue
            cell: dict[str, Any] = {"batch": batch, "context": context}
            name = f"{batch}x{context}"
            cell.update(engine_cell(engine, batch, context, args.steps, name in args.host_profile,
                                    name in args.kernel_profile, name in args.step_trace))
            mean_ctx = context + WARMUP_STEPS + args.steps / 2
            cell["floor_ms"] = (weight_bytes + batch * mean_ctx * kv_per_token) / bw * 1e3
            cell["ratio"] = cell["step_ms"] / cell["floor_ms"]
            ms = bench.time(triton_decode.paged_decode, batch, context)
            cell["attn_ms"] = ms
            cell["attn_gbps"] = bench.kv_bytes(batch, context) / ms / 1e6
            cell["attn_of_copy"] = cell["attn_gbps"] * 1e9 / bw
            if baseline is not None:
                old = bench.time(baseline.paged_decode, batch, context)
                cell["baseline_attn_ms"] = old
                cell["baseline_attn_gbps"] = bench.kv_bytes(batch, context) / old / 1e6
            cells.append(cell)
            print(json.dumps(cell), flush=True)
        doc["cells"] = cells
        doc["kernel_rel_err_48x3072"] = bench.check(48, 3072)
    finally:
        engine.shutdown()


def table(doc: dict[str, Any]) -> str:
    lines = ["| batch x context | step | replay | floor | ratio | attention kernel | of copy BW |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in doc["cells"]:
        if "skipped" in c:
            lines.append(f"| {c['batch']} x {c['context']} | {c['skipped']} | | | | | |")
            continue
        old = f" (was {c['baseline_attn_gbps']:.0f})" if "baseline_attn_gbps" in c else ""
        replay_ms = c.get("replay_ms", float("nan"))
        lines.append(f"| {c['batch']} x {c['context']} | {c['step_ms']:.2f} ms | {replay_ms:.2f} ms "
                     f"| {c['floor_ms']:.2f} ms | {c['ratio']:.2f}x | {c['attn_ms'] * 1e3:.0f} us = "
                     f"{c['attn_gbps']:.0f} GB/s{old} | {100 * c['attn_of_copy']:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--context", type=int, nargs="+", default=[128, 1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--baseline-kernel", type=Path)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-cells", nargs="*", default=[], help="cells (BxC) to sweep; default decode_sweep.CELLS")
    parser.add_argument("--cells", nargs="*", default=[], help="more cells, e.g. 48x3072 1x8000")
    parser.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                        help="one step at a time (the engine's async scheduling off)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                        help="fp8: the e4m3 cache (its bytes per token enter the floor at 1 byte per value)")
    parser.add_argument("--kernel-profile", nargs="*", default=[],
                        help="cells (BxC) whose replayed step is profiled per CUDA kernel (torch.profiler)")
    parser.add_argument("--step-trace", nargs="*", default=[],
                        help="cells (BxC) whose engine steps' GPU timeline is traced after the timed steps: busy "
                             "time, idle gaps between kernels, every kernel and copy per step (torch.profiler)")
    parser.add_argument("--host-profile", nargs="*", default=[], help="cells (BxC) whose steps run under cProfile")
    parser.add_argument("--ablate-norms", action="store_true",
                        help="no RMSNorm kernels after the first (moe_speed.ablate_norms): wrong outputs, step times "
                             "only, to see what the norms cost inside a step")
    parser.add_argument("--argmax", default="graph", choices=ARGMAX_VARIANTS,
                        help="where a step's greedy argmax runs (limits.argmax_variant), for an A/B in one call")
    parser.add_argument("--bf16-logits", action="store_true",
                        help="the LM head's product in bf16, then .float() (limits.bf16_logits), for A/B runs")
    parser.add_argument("--no-gemv-fold", action="store_true",
                        help="the block-FP8 GEMV as before the fold rule and the per-shape table: GEMV_CONFIG for "
                             "every weight, scales never folded into x (kernels.gemv_launch), for an A/B in one call")
    parser.add_argument("--decode-gemm-table", type=Path,
                        help="a decode_gemm_speed.py JSON: its fastest launches as the decode-GEMM table "
                             "(limits.decode_gemm_table), for an A/B before a table is committed")
    parser.add_argument("--merge-table", action="store_true",
                        help="keep the committed table's entries for shapes and rows the sweep did not time")
    args = parser.parse_args()
    if args.decode_gemm_table:
        print("decode-GEMM table:", decode_gemm_table(args.decode_gemm_table, merge=args.merge_table), flush=True)
    if args.no_gemv_fold:
        untuned_fp8_gemv()
    argmax_variant(args.argmax)
    if args.bf16_logits:
        bf16_logits()
    if args.ablate_norms:
        from moe_speed import ablate_norms

        ablate_norms()
    doc: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "async_scheduling": args.async_scheduling, "kv_cache_dtype": args.kv_cache_dtype,
                           "ablated": ["norms"] if args.ablate_norms else [],
                           "gemv": "untuned" if args.no_gemv_fold else "tuned",
                           "argmax": args.argmax, "logits": "bf16" if args.bf16_logits else "float32",
                           "swiglu": os.environ.get("PDLAUNCH_SWIGLU", "auto"),
                           "decode_gemm": os.environ.get("PDLAUNCH_DECODE_GEMM", "auto"),
                           "decode_gemm_table": str(args.decode_gemm_table or "")}
    doc.update(copy_bandwidth(2.0))
    run_grid(args, doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    print(f"{doc['device']}: copy {doc['copy_gbps']:.0f} GB/s (read + write), "
          f"weights {doc['weight_bytes'] / 1e9:.2f} GB, "
          f"kernel rel. error at 48 x 3072 {doc['kernel_rel_err_48x3072']:.1e}")
    print(table(doc))


if __name__ == "__main__":
    main()
