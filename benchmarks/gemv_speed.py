"""One-row projections: cuBLAS (F.linear) against the Triton GEMV (pdlaunch/model/gemv.py), per shape and config.

    python benchmarks/gemv_speed.py [--json OUT] [--shapes NAME ...] [--configs RxCxW ...]

us per call in CUDA-graph replays of 20 calls, eight weights in rotation so that L2 holds none of them, each call
launched as in a decode step (dependent on the one before when triton_decode.pdl_enabled; PDLAUNCH_PDL=off for
plain launches), and the share of copy bandwidth (weight bytes / time against limits.copy_bandwidth). Each config's
output is checked against float64 (relative error).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a tree put there wins
from limits import copy_bandwidth, graph_call_ms  # noqa: E402

from pdlaunch.model.gemv import GEMV_CONFIG, config_for, gemv  # noqa: E402

SHAPES = {  # (N, K)
    "llama3-8b qkv": (6144, 4096), "llama3-8b o": (4096, 4096), "llama3-8b gate_up": (28672, 4096),
    "llama3-8b down": (4096, 14336), "qwen3-30b-a3b qkv": (5120, 2048), "qwen3-30b-a3b o": (2048, 4096),
    "llama3-8b lm_head": (128256, 4096),
}
CONFIGS = [GEMV_CONFIG, (4, 1024, 4), (16, 512, 4), (8, 1024, 8), (16, 256, 4), (4, 512, 4), (4, 256, 4)]
CALLS = 20
ROTATE = 8


def shape_row(name: str, n: int, k: int, copy_bps: float,
              configs: list[tuple[int, int, int]] = CONFIGS) -> dict[str, Any]:
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(ROTATE)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    want = x.double() @ weights[0].double().t()
    nbytes = n * k * 2
    row: dict[str, Any] = {"shape": name, "n": n, "k": k, "floor_us": nbytes / copy_bps * 1e6}

    def entry(us: float, y: torch.Tensor) -> dict[str, float]:
        return {"us": round(us, 2), "of_copy": round(nbytes / (us / 1e6) / copy_bps, 3),
                "rel_err": round(((y.double() - want).norm() / want.norm()).item(), 5)}

    us = graph_call_ms(lambda i: F.linear(x, weights[i % ROTATE]), CALLS) * 1e3
    row["cublas"] = entry(us, F.linear(x, weights[0]))
    row["chosen"] = "x".join(map(str, config_for(torch.cuda.get_device_name(), n, k)))
    for config in configs:
        us = graph_call_ms(lambda i, config=config: gemv(x, weights[i % ROTATE], config=config), CALLS) * 1e3
        row["x".join(map(str, config))] = entry(us, gemv(x, weights[0], config=config))
    return row


def _launch(text: str) -> tuple[int, int, int]:
    """--configs value: BLOCK_NxBLOCK_KxWARPS, e.g. 4x1024x4."""
    parts = text.split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not BLOCK_NxBLOCK_KxWARPS, e.g. 4x1024x4")
    return int(parts[0]), int(parts[1]), int(parts[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shapes", nargs="*", choices=list(SHAPES), default=list(SHAPES),
                        help="the weights to time (default: all)")
    parser.add_argument("--configs", nargs="*", type=_launch, default=[],
                        help="launches to time instead of the default list, as BLOCK_NxBLOCK_KxWARPS (e.g. 4x1024x4)")
    args = parser.parse_args()
    configs = args.configs or CONFIGS
    torch.manual_seed(0)
    copy_bps = copy_bandwidth(1.0)["copy_gbps"] * 1e9
    rows = []
    for name in args.shapes:
        n, k = SHAPES[name]
        rows.append(shape_row(name, n, k, copy_bps, configs))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbps": copy_bps / 1e9,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
