"""Block-FP8 attention projections (Qwen3-30B-A3B, Llama-3-8B) at decode batches, weights in rotation (issue 27).

    python benchmarks/fp8_small_m_rotated.py [--rows 16 64] [--shapes moe_qkv ...] [--json OUT]

`fp8_bench.py --small-m` times each projection on one weight, which the H200's 50 MB L2 holds after the first
call; in a decode step every weight comes from HBM. Here each call reads the next of enough copies (>= 256 MB) in
a CUDA graph of 24 calls, as a step replays them: what `block_fp8_linear` picks today, the activation
quantization launch alone, the tiled GEMM's configurations and the split GEMM's, per shape and row count, us per
call and the share of copy bandwidth (weight bytes / time).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits import copy_bandwidth, graph_call_ms  # noqa: E402

from pdlaunch.model.quant import fp8  # noqa: E402
from pdlaunch.model.quant.activations import quantize_rows  # noqa: E402
from pdlaunch.model.quant.gemm import block_fp8_linear  # noqa: E402
from pdlaunch.model.quant.split_gemm import block_fp8_split_gemm, split_config  # noqa: E402

SHAPES = {"moe_qkv": (5120, 2048), "moe_o": (2048, 4096), "llama_qkv": (6144, 4096), "llama_o": (4096, 4096),
          "llama_down": (4096, 14336), "llama_gate_up": (28672, 4096)}
TILED = [(16, 32, 4, 4), (16, 64, 4, 4), (64, 64, 4, 4), (64, 32, 4, 4), (64, 64, 4, 6), (64, 128, 4, 3),
         (32, 64, 4, 4)]
SPLIT = [(64, 1, 4, 4), (64, 2, 4, 4), (64, 4, 4, 4), (64, 8, 4, 4), (32, 1, 4, 4), (32, 2, 4, 4), (32, 4, 4, 4),
         (64, 2, 4, 6), (64, 4, 4, 6), (128, 2, 4, 4), (128, 4, 4, 4), (32, 2, 4, 6), (64, 8, 4, 6), (64, 16, 4, 4),
         (32, 8, 4, 4)]
CALLS = 24


def shape_row(name: str, m: int, ws: list[tuple[torch.Tensor, torch.Tensor]], bw: float, sms: int) -> dict[str, Any]:
    """Every timing of one projection shape at `m` rows, its weights in rotation (`ws`)."""
    n, k = ws[0][0].shape
    rotate = len(ws)
    floor_us = n * k / bw * 1e6
    x = torch.randn(m, k, device="cuda").bfloat16()
    want = x.float() @ fp8.dequantize(*ws[0], block=128).float().t()
    row: dict[str, Any] = {"shape": name, "m": m, "floor_us": floor_us,
                           "split_config_today": split_config(n, k, sms, m)}
    timed: dict[str, Any] = {"today": lambda i: block_fp8_linear(x, *ws[i % rotate], torch.bfloat16),
                             "quant_only": lambda i: quantize_rows(x, 128)}
    for cfg in TILED:
        timed[f"tiled{cfg}"] = lambda i, cfg=cfg: block_fp8_linear(x, *ws[i % rotate], torch.bfloat16, cfg)
    if m <= 64:
        for cfg in SPLIT:
            timed[f"split{cfg}"] = lambda i, cfg=cfg: block_fp8_split_gemm(x, *ws[i % rotate], torch.bfloat16, cfg)
    for label, fn in timed.items():
        try:
            got = fn(0)
            if label != "quant_only":
                err = float((got.float() - want).norm() / want.norm())
                assert err < 5e-2, (label, err)
            us = graph_call_ms(fn, CALLS) * 1e3
        except Exception as exc:  # noqa: BLE001 (a config that does not compile or run is reported)
            row[label] = f"{type(exc).__name__}: {str(exc)[:100]}"
            continue
        row[label] = {"us": round(us, 2), "of_copy": round(floor_us / us, 3)}
    best = min((v["us"], lbl) for lbl, v in row.items() if isinstance(v, dict) and lbl not in ("today", "quant_only"))
    row["best"] = {"label": best[1], "us": best[0]}
    print(json.dumps({"shape": name, "m": m, "floor_us": round(floor_us, 2), "today": row["today"],
                      "quant_only": row["quant_only"], "best": row["best"]}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bw = copy_bandwidth(2.0)["copy_gbps"] * 1e9
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "copy_gbps": bw / 1e9, "rows": []}
    for name in args.shapes:
        n, k = SHAPES[name]
        rotate = max(2, -(-(256 << 20) // (n * k)))
        ws = [fp8.quantize_block(torch.randn(n, k, device="cuda") * 0.02) for _ in range(rotate)]
        out["rows"] += [shape_row(name, m, ws, bw, sms) for m in args.rows]
        ws.clear()
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
