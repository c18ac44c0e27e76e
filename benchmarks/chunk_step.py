"""Colocated chunked prefill on one GPU: wall time of each engine step while one 3072-token prompt is
prefilled in 512-token chunks (the colocated budget before 2026-11-24), alone and next to 16 running decodes, and the
GPU kernels of one chunk step (torch.profiler). Usage: python benchmarks/chunk_step.py CHECKPOINT
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pdlaunch.engine.llm import build_config  # noqa: E402
from pdlaunch.engine.llm_engine import LLMEngine  # noqa: E402
from pdlaunch.engine.outputs import SamplingParams  # noqa: E402


def main() -> None:
    config = build_config(sys.argv[1], "cuda", "bfloat16", {"max_num_seqs": 64, "max_num_batched_tokens": 512,
                                                             "max_model_len": 4096, "gpu_memory_utilization": 0.85})
    engine = LLMEngine(config)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    try:
        for label, decodes in (("warm-up", 0), ("alone", 0), ("next to 16 decodes", 16)):
            for j in range(decodes):
                engine.add_request(f"{label}-d{j}", [rng.randrange(10, 500) for _ in range(64)], params)
            for _ in range(3 if decodes else 0):
                engine.step()
            engine.add_request(f"{label}-p", [rng.randrange(10, 500) for _ in range(3072)],
                               SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
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
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
