"""pdlaunch engine speed against the hardware limits measured in the same run (issue 9 targets).

    python benchmarks/engine_speed.py CKPT_DIR [--json OUT] [--eager-too]

One process: first the ceilings (benchmarks/limits.py: device copy bandwidth counting read +
write, bf16 matmul rate), then an in-process engine (colocated, bf16, CUDA graphs unless
--enforce-eager) on the checkpoint:

- decode batch 1: one 128-token prompt, 256 new tokens; the median wall time of `engine.step()`
  over the decode steps (scheduler, input staging, graph replay, sampling and detokenizing
  included), against the floor weight bytes / copy bandwidth;
- prefill 4096: `engine.step()` of a fresh 4096-token prompt (prefix caching off), median of 5,
  against 2 x 6.98e9 x T + attention FLOPs at the measured matmul rate (limits.py's count);
- batch 64: 64 prompts of 128 tokens decoding 128 tokens each; step time and output tokens/s of
  the decode-only steps (every sequence running).

`--eager-too` repeats the decode batch-1 and batch-64 figures with CUDA graphs off.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits import copy_bandwidth, llama3_8b_figures, matmul_rate, time_ms  # noqa: E402

from pdlaunch.engine.llm import build_config  # noqa: E402
from pdlaunch.engine.llm_engine import LLMEngine  # noqa: E402
from pdlaunch.engine.outputs import SamplingParams  # noqa: E402

rng = random.Random(0)


def random_prompt(n: int) -> list[int]:
    return [rng.randrange(1000, 100000) for _ in range(n)]


def step_times(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> list[float]:
    """Seconds of every step after the one that finished the last prefill (decode-only steps)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", p, params)
    times = []
    while engine.has_unfinished_requests():
        prefilling = any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.requests.values())
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if not prefilling:
            times.append(dt)
    return times


def prefill_ms(engine: LLMEngine, tokens: int, repeat: int = 5) -> float:
    times = []
    for i in range(repeat + 1):
        engine.add_request(f"p{i}", random_prompt(tokens), SamplingParams(max_tokens=1, temperature=0.0))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        if i:  # the first one warms up the prefill path
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def engine_figures(ckpt: str, eager: bool, with_prefill: bool) -> dict[str, Any]:
    config = build_config(ckpt, "cuda", "bfloat16", {"max_num_seqs": 64, "max_num_batched_tokens": 8192,
                                                      "max_model_len": 8192, "enable_prefix_caching": False,
                                                      "enforce_eager": eager})
    engine = LLMEngine(config)
    try:
        out: dict[str, Any] = {"cuda_graphs": engine.runner.graphs is not None}
        step_times(engine, [random_prompt(128)], 8)  # warm-up
        b1 = step_times(engine, [random_prompt(128)], 256)
        out["decode_b1_step_ms"] = statistics.median(b1) * 1e3
        out["decode_b1_step_p90_ms"] = sorted(b1)[int(0.9 * len(b1))] * 1e3
        b64 = step_times(engine, [random_prompt(128) for _ in range(64)], 128)
        out["decode_b64_step_ms"] = statistics.median(b64) * 1e3
        out["decode_b64_tokens_per_s"] = 64 / statistics.median(b64)
        graphs = engine.runner.graphs
        if graphs is not None:  # GPU time alone: replays of the last inputs (finished requests' slots)
            for size in (1, 64):
                out[f"graph_b{size}_replay_ms"] = time_ms(graphs.graphs[size][0].replay)
        if with_prefill:
            out["prefill_4096_ms"] = prefill_ms(engine, 4096)
        return out
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--eager-too", action="store_true")
    args = parser.parse_args()

    doc: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    doc.update(copy_bandwidth(2.0))
    doc.update(matmul_rate(8192))
    model = llama3_8b_figures()
    weight_bytes = model["weight_bytes"]
    doc["weight_bytes"] = weight_bytes
    doc["decode_floor_ms"] = weight_bytes / (doc["copy_gbps"] * 1e9) * 1e3
    doc["prefill_floor_ms"] = model["prefill_flops"] / (doc["matmul_tflops"] * 1e12) * 1e3
    doc["graphs"] = engine_figures(args.checkpoint, eager=False, with_prefill=True)
    g = doc["graphs"]
    doc["decode_b1_ratio"] = g["decode_b1_step_ms"] / doc["decode_floor_ms"]
    doc["prefill_matmul_fraction"] = doc["prefill_floor_ms"] / g["prefill_4096_ms"]
    if args.eager_too:
        doc["eager"] = engine_figures(args.checkpoint, eager=True, with_prefill=False)
    text = json.dumps(doc, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
