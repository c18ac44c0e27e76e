"""Async scheduling on and off give the same tokens on a GPU (CUDA graphs, bf16): greedy and seeded
requests of mixed lengths, some ending on a stop id mid-batch. Exit 1 on a difference.

    python benchmarks/async_parity.py [--model tiny|CKPT]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: a tree put there wins

from pdlaunch.engine.llm import LLM  # noqa: E402
from pdlaunch.engine.outputs import SamplingParams  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 400) for _ in range(rng.randint(1, 300))] for _ in range(24)]
    params = [SamplingParams(max_tokens=48, temperature=0.0 if i % 3 else 0.9, seed=i, ignore_eos=i % 4 != 1,
                             stop_token_ids=[17, 42] if i % 4 == 1 else [])
              for i in range(len(prompts))]
    results = {}
    for on in (False, True):
        with LLM(args.model, device="cuda", dtype="bfloat16", max_num_seqs=16, async_scheduling=on) as llm:
            assert llm.engine.async_scheduling == on and llm.engine.runner.graphs is not None
            results[on] = [o.token_ids for o in llm.generate(prompts, params)]
    same = sum(a == b for a, b in zip(results[False], results[True]))
    print(f"async scheduling on vs off: {same}/{len(prompts)} requests with identical tokens "
          f"({sum(map(len, results[True]))} tokens)")
    return 0 if same == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
