"""The sampler's argmax of a step's logits: torch's `argmax(dim=-1)` against `fused_ops.argmax_rows`, in one run.

    python benchmarks/argmax_speed.py [--rows 1 8 64 128 256] [--vocab 128256 151936] [--json OUT]

us per call, float32 logits [rows, vocab] of random values, each timed eagerly (CUDA events around one call, as
the engine launches it after a step's graph) and in a CUDA graph of 10 calls (the GPU time alone); every call's
ids are checked equal to torch's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parent))
from limits import graph_call_ms, time_ms  # noqa: E402

from pdlaunch.model.fused_ops import argmax_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 128, 256])
    parser.add_argument("--vocab", type=int, nargs="+", default=[128256, 151936])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    for vocab in args.vocab:
        for rows in args.rows:
            logits = torch.randn(rows, vocab, device="cuda")
            assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
            row: dict[str, Any] = {"rows": rows, "vocab": vocab}
            calls = {"torch": lambda x=logits: x.argmax(dim=-1), "argmax_rows": lambda x=logits: argmax_rows(x)}
            for name, fn in calls.items():
                row[f"{name}_eager_us"] = round(time_ms(fn) * 1e3, 2)
                row[f"{name}_graph_us"] = round(graph_call_ms(lambda i, fn=fn: fn(), 10) * 1e3, 2)
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
