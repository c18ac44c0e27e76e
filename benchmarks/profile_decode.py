"""Where a decode step's GPU time goes: torch.profiler over eager decode steps, kernels by total time.

    python benchmarks/profile_decode.py CKPT_DIR [--batch 1] [--context 256] [--steps 5]

Runs the engine eagerly (CUDA graphs replay the same kernels, minus the launch gaps), decodes
`--batch` sequences whose prompts are `--context` tokens, profiles `--steps` decode steps and
prints the top kernels by CUDA time per step. Warm-up steps until every prompt is computed (48
prompts of 3072 tokens take ~18 prefill steps), then two decode steps, so only decode is profiled.
"""

from __future__ import annotations

import argparse
import random

import torch
from torch.profiler import ProfilerActivity, profile

from pdlaunch.engine.llm import build_config
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(0)
    engine = LLMEngine(build_config(args.checkpoint, "cuda", "bfloat16",
                                    {"enforce_eager": True, "enable_prefix_caching": False,
                                     "max_num_seqs": max(64, args.batch),
                                     "max_num_batched_tokens": 8192,
                                     "max_model_len": args.context + 256}))
    # Enough tokens that the first prompts still decode when the last prefill ends (shutdown aborts them).
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", [rng.randrange(1000, 100000) for _ in range(args.context)], params)
    requests = engine.scheduler.requests.values
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in requests()):
        engine.step()
    for _ in range(2):  # the first decode steps warm up
        engine.step()
    print(f"{len(engine.scheduler.running)} running of {len(engine.scheduler.requests)} unfinished requests")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    print(f"GPU time per decode step: {total / args.steps / 1e3:.3f} ms (batch {args.batch}, context {args.context})")
    for e in events[:20]:
        print(f"{e.device_time_total / args.steps / 1e3:8.3f} ms  {e.count // args.steps:5d}x  {e.key[:110]}")
    engine.shutdown()


if __name__ == "__main__":
    main()
