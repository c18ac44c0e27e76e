"""Colocated chunked prefill on one GPU: wall time of each engine step while one 3072-token prompt is
prefilled in chunks of `--budget` tokens (default 512, the colocated budget before 2026-11-24), alone and next to 16
running decodes, the GPU kernels of one chunk step (torch.profiler), and with `--cprofile N` the host functions of N
chunk steps next to 16 decodes (cProfile, by own time). `--enforce-eager`: without CUDA graphs, for comparison with
the piecewise graphs of steps with prompts (runner/mixed_graphs.py). `--cap C`: scheduler.prompt_tokens_while_decoding
(the chunk beside decodes; default the config's). The chunk steps next to decodes are also timed back to back, as
serving runs them (no synchronisation between them: with async scheduling the host's work overlaps the device's).
Usage: python benchmarks/chunk_step.py CHECKPOINT [--budget B] [--cap C] [--enforce-eager]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a tree put there wins
from pdlaunch.engine.llm import build_config  # noqa: E402
from pdlaunch.engine.llm_engine import LLMEngine  # noqa: E402
from pdlaunch.engine.outputs import SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens (the chunk size)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="cProfile N chunk steps")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (decode nor piecewise)")
    parser.add_argument("--cap", type=int, default=None, help="scheduler.prompt_tokens_while_decoding")
    args = parser.parse_args()
    overrides: dict[str, object] = {
        "max_num_seqs": 64, "max_num_batched_tokens": args.budget, "max_model_len": 4096,
        "gpu_memory_utilization": 0.85, "enforce_eager": args.enforce_eager}
    if args.cap is not None:
        overrides["prompt_tokens_while_decoding"] = args.cap
    config = build_config(args.checkpoint, "cuda", "bfloat16", overrides)
    engine = LLMEngine(config)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    try:
        def start(label: str, decodes: int) -> None:
            """`decodes` 64-token requests decoding, then one 3072-token prompt waiting to be chunked."""
            for j in range(decodes):
                engine.add_request(f"{label}-d{j}", [rng.randrange(10, 500) for _ in range(64)], params)
            for _ in range(3 if decodes else 0):
                engine.step()
            engine.add_request(f"{label}-p", [rng.randrange(10, 500) for _ in range(3072)],
                               SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))

        for label, decodes in (("warm-up", 0), ("alone", 0), ("next to 16 decodes", 16)):
            start(label, decodes)
            times = []
            for _ in range(8):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                engine.step()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            print(label, "step ms:", " ".join(f"{t:.1f}" for t in times), flush=True)
            while engine.has_unfinished_requests():
                engine.step()
        # Back to back, as serving runs them: the prompt's chunk steps next to 16 decodes, synchronised only
        # around the whole run, against the same count of decode steps alone.
        for label, prompt in (("back to back, chunk steps next to 16 decodes", True),
                              ("back to back, 16 decodes alone", False)):
            start(label, 16)
            if not prompt:
                engine.abort_request(f"{label}-p")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            chunks = -(-3072 // min(args.budget, args.cap or (1024 if args.cap is None else args.budget)))
            for _ in range(chunks):
                engine.step()
            torch.cuda.synchronize()
            print(label, f"mean step ms: {(time.perf_counter() - t0) * 1e3 / chunks:.2f}", flush=True)
            while engine.has_unfinished_requests():
                engine.step()
        engine.add_request("prof-p", [rng.randrange(10, 500) for _ in range(3072)],
                           SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        engine.step()
        engine.step()
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
        while engine.has_unfinished_requests():
            engine.step()
        if args.cprofile:
            start("cprofile", 16)
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.cprofile):
                engine.step()
            torch.cuda.synchronize()
            profiler.disable()
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(40)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
