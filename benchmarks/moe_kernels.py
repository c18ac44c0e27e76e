"""One MoE layer of the Qwen3-30B-A3B shape: torch._grouped_mm against our Triton kernels, per token count.

    python benchmarks/moe_kernels.py [--tokens 1 16 64 256 4096 8192 16384] [--json OUT] [--write-config] [--fp8]

bf16, 128 experts, top-8, hidden 2048, expert width 768 (TP 1), a random router (tokens spread about
evenly). For each token count: `fused_moe` end to end (sort, padding, both GEMMs, combine) with the
grouped_mm backend and with the Triton backend under each tile configuration of a small sweep, every
call replayed from a CUDA graph as the engine runs decode. Figures per size:
- decode sizes: the bytes of the experts the batch routes to / copy bandwidth (benchmarks/limits.py)
  = the floor; ratio = time / floor;
- prefill sizes: active-expert FLOPs (2 * T * k * 3 * H * I) / time, against the bf16 matmul rate.
`--write-config` writes the faster backend and the best tile per size to
pdlaunch/model/moe/configs/<device>.json (fused_moe reads it on that device); with `--fp8` the experts
are 128x128-block fp8 (Triton only) and the file is <device>_fp8.json; every tile runs with bf16
activations (W8A16), with the same activations in float16 products (`f16_products`: no quantization
launch, rounding no worse than bf16's) and with fp8 ones (W8A8, `fp8_activations` in the file); W8A8 is
kept only where it is at least 5% faster than the better 16-bit mode, its activations costing ~4% relative
error against ~0.5% (`w8a16_best_ms` / `w8f16_best_ms` / `w8a8_best_ms` per size in the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits import copy_bandwidth, matmul_rate, time_ms  # noqa: E402

from pdlaunch.model.moe.fused import TileConfig, config_file, fused_moe, moe_reference  # noqa: E402
from pdlaunch.model.moe.router import route  # noqa: E402
from pdlaunch.model.quant import fp8  # noqa: E402

EXPERTS, TOP_K, HIDDEN, INTER = 128, 8, 2048, 768
W8A8_MIN_GAIN = 0.95  # the tile file names fp8 activations only where they are at least 5% faster
MAX_REL_ERR = 0.06  # fp8 activations round to 3 mantissa bits: about 3% against the float32 loop
SMALL = [TileConfig(0, "triton", 16, n, k, w, s) for n, k, w, s in
         [(64, 128, 4, 3), (128, 128, 4, 3), (64, 256, 4, 3), (32, 256, 4, 4), (128, 64, 4, 4), (64, 64, 4, 5)]]
SMALL_FP8 = [TileConfig(0, "triton", 16, n, k, w, s) for n, k, w, s in
             [(64, 128, 4, 3), (128, 128, 4, 3), (128, 128, 4, 4), (256, 128, 4, 3), (128, 128, 8, 4),
              (64, 128, 4, 5), (32, 128, 4, 4), (64, 64, 4, 4)]]
# swap_ab: the weight tile is the warpgroup MMA's 64-row side and the block's 16 rows its n (decode on Hopper)
SWAPPED = [TileConfig(0, "triton", 16, n, 128, w, s, swap_ab=True) for n, w, s in
           [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 4, 4), (64, 4, 5), (256, 4, 3)]]
SMALL += SWAPPED
SMALL_FP8 += SWAPPED
LARGE = [TileConfig(0, "triton", m, n, k, w, s) for m, n, k, w, s in
         [(32, 128, 64, 4, 4), (64, 128, 64, 4, 3), (64, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3),
          (64, 64, 128, 4, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (128, 128, 32, 8, 5)]]


def _graphed(fn: Any) -> Any:
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def layer_inputs(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One layer's bf16 tokens, experts (w13, w2) and random routing (weights, ids), seeded by the token
    count, and the number of distinct experts routed."""
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, HIDDEN, device="cuda", generator=gen).bfloat16()
    w13 = (0.02 * torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda", generator=gen)).bfloat16()
    w2 = (0.02 * torch.randn(EXPERTS, HIDDEN, INTER, device="cuda", generator=gen)).bfloat16()
    weights, ids = route(torch.randn(tokens, EXPERTS, device="cuda", generator=gen), TOP_K, True)
    return x, w13, w2, weights, ids, int(ids.unique().numel())


def bench_size(tokens: int, copy_gbps: float, tflops: float, fp8: bool = False,
               swapped_only: bool = False) -> dict[str, Any]:
    x, w13, w2, weights, ids, routed = layer_inputs(tokens)
    expert_bytes = routed * 3 * HIDDEN * INTER * 2
    if fp8:  # 128x128-block fp8 experts (W8A16 Triton kernels; grouped_mm has no fp8 path)
        return bench_size_fp8(tokens, x, w13, w2, weights, ids, routed, copy_gbps, tflops, swapped_only)
    flops = 2 * tokens * TOP_K * 3 * HIDDEN * INTER
    row: dict[str, Any] = {"tokens": tokens, "experts_routed": routed, "expert_mib": expert_bytes / 2**20,
                           "floor_ms": expert_bytes / copy_gbps / 1e6, "active_gflop": flops / 1e9}
    sample = slice(0, min(tokens, 64))
    want = moe_reference(x[sample].float(), w13.float(), w2.float(), weights[sample], ids[sample])

    def check(out: torch.Tensor) -> float:
        return ((out[sample].float() - want).norm() / want.norm()).item()

    row["grouped_mm_ms"] = time_ms(_graphed(lambda: fused_moe(x, w13, w2, weights, ids, use="grouped_mm")))
    row["grouped_mm_rel_err"] = check(fused_moe(x, w13, w2, weights, ids, use="grouped_mm"))
    triton_rows = []
    for tile in (SMALL if tokens <= 256 else LARGE):
        try:
            ms = time_ms(_graphed(lambda tile=tile: fused_moe(x, w13, w2, weights, ids, tile=tile)))
            err = check(fused_moe(x, w13, w2, weights, ids, tile=tile))
        except Exception as exc:  # a tile that does not compile (shared memory) is skipped, and said so
            triton_rows.append({**asdict(tile), "error": str(exc).splitlines()[0][:160]})
            continue
        triton_rows.append({**asdict(tile), "ms": ms, "rel_err": err})
    row["triton"] = triton_rows
    best = min((r for r in triton_rows if "ms" in r), key=lambda r: r["ms"])
    row["triton_best"] = best
    winner = "triton" if best["ms"] < row["grouped_mm_ms"] else "grouped_mm"
    row["faster"] = winner
    ms = min(best["ms"], row["grouped_mm_ms"])
    row["best_ms"] = ms
    row["ratio_to_floor"] = ms / row["floor_ms"]
    row["of_matmul_rate"] = flops / ms / 1e9 / tflops
    print(json.dumps({k: v for k, v in row.items() if k != "triton"}), flush=True)
    return row


def bench_size_fp8(tokens: int, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                   ids: torch.Tensor, routed: int, copy_gbps: float, tflops: float,
                   swapped_only: bool = False) -> dict[str, Any]:
    q13, s13 = fp8.quantize_stacked_blocks(w13)
    q2, s2 = fp8.quantize_stacked_blocks(w2)
    scales = (s13, s2)
    per_expert = (q13[0].numel() + q2[0].numel()) + (s13[0].numel() + s2[0].numel()) * 4
    flops = 2 * tokens * TOP_K * 3 * HIDDEN * INTER
    row: dict[str, Any] = {"tokens": tokens, "experts_routed": routed, "expert_mib": routed * per_expert / 2**20,
                           "floor_ms": routed * per_expert / copy_gbps / 1e6, "active_gflop": flops / 1e9}
    sample = slice(0, min(tokens, 64))
    deq13 = fp8.dequantize_stacked_blocks(q13, s13)
    deq2 = fp8.dequantize_stacked_blocks(q2, s2)
    want = moe_reference(x[sample].float(), deq13, deq2, weights[sample], ids[sample])
    del deq13, deq2
    rows = []
    candidates = (SWAPPED if swapped_only else SMALL_FP8) if tokens <= 256 else LARGE
    # each tile three times: bf16 activations (W8A16), the same in float16 products (`f16_products`), and fp8
    # activations per token and 128 columns (W8A8)
    for tile in [*candidates, *(replace(t, f16_products=True) for t in candidates),
                 *(replace(t, fp8_activations=True) for t in candidates)]:
        try:
            ms = time_ms(_graphed(lambda tile=tile: fused_moe(x, q13, q2, weights, ids, tile=tile, scales=scales)))
            out = fused_moe(x, q13, q2, weights, ids, tile=tile, scales=scales)
        except Exception as exc:  # a tile that does not compile (shared memory) is skipped, and said so
            rows.append({**asdict(tile), "error": str(exc).splitlines()[0][:160]})
            continue
        err = ((out[sample].float() - want).norm() / want.norm()).item()
        rows.append({**asdict(tile), "ms": ms, "rel_err": err})
    # a tile whose result is off (rel_err against the float32 loop on the dequantized weights) cannot win
    usable = [r for r in rows if "ms" in r and r["rel_err"] < MAX_REL_ERR]
    def mode_of(r: dict[str, Any]) -> str:
        return "w8a8" if r["fp8_activations"] else "w8f16" if r["f16_products"] else "w8a16"

    best_of = {mode: min((r for r in usable if mode_of(r) == mode), key=lambda r: r["ms"], default=None)
               for mode in ("w8a16", "w8f16", "w8a8")}
    for mode, found in best_of.items():
        row[f"{mode}_best_ms"] = found["ms"] if found else None
    # float16 products round no worse than bf16 ones: the faster of the two; fp8 activations cost ~4% relative
    # error against their ~0.5%: they win only where clearly faster
    sixteen = [r for r in (best_of["w8a16"], best_of["w8f16"]) if r is not None]
    w8a16 = min(sixteen, key=lambda r: r["ms"], default=None)
    w8a8 = best_of["w8a8"]
    best = w8a8 if w8a16 is None or (w8a8 is not None and w8a8["ms"] < W8A8_MIN_GAIN * w8a16["ms"]) else w8a16
    row.update(triton=rows, triton_best=best, faster="triton", best_ms=best["ms"],
               ratio_to_floor=best["ms"] / row["floor_ms"], of_matmul_rate=flops / best["ms"] / 1e9 / tflops)
    print(json.dumps({k: v for k, v in row.items() if k != "triton"}), flush=True)
    return row


def tile_entries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per measured size: the faster backend and the best Triton tile, covering sizes up to it."""
    entries = []
    for i, row in enumerate(rows):
        best = row["triton_best"]
        limit = row["tokens"] if i + 1 < len(rows) else 1 << 30
        tile = TileConfig(limit, row["faster"], best["block_m"], best["block_n"], best["block_k"],
                          best["num_warps"], best["num_stages"], best.get("fp8_activations", False),
                          best.get("swap_ab", False), best.get("f16_products", False))
        entries.append(asdict(replace(tile)))
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256, 1024, 4096, 8192, 16384])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write-config", action="store_true")
    parser.add_argument("--fp8", action="store_true", help="128x128-block fp8 experts (their own tile file)")
    parser.add_argument("--swapped-only", action="store_true",
                        help="fp8, up to 256 tokens: only the swap_ab tiles (the winners of every earlier fp8 "
                             "decode sweep on an H100 and an H200), a third of the sweep's time")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    doc: dict[str, Any] = {"device": device, "torch": torch.__version__,
                           "shape": {"experts": EXPERTS, "top_k": TOP_K, "hidden": HIDDEN, "inter": INTER}}
    doc.update(copy_bandwidth(2.0))
    doc.update(matmul_rate(8192))
    doc["fp8"] = args.fp8
    doc["rows"] = [bench_size(t, doc["copy_gbps"], doc["matmul_tflops"], args.fp8, args.swapped_only)
                   for t in sorted(args.tokens)]
    if args.write_config:
        path = config_file(device, args.fp8)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": device, "source": "benchmarks/moe_kernels.py",
                                    "entries": tile_entries(doc["rows"])}, indent=1) + "\n")
        doc["config_written"] = str(path)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
