"""A chat turn's time to first token inside one engine, next to running decodes: the step that holds a short
prompt over a cached conversation (runner/cuda_graphs.py's prompt rows against the piecewise replay,
PDLAUNCH_PROMPT_ROWS=off), and the decode steps around it.

16 requests decode (64-token prompts, running throughout); a 1536-token conversation is prefilled once (cached);
then ROUNDS turns of NEW fresh tokens after it arrive one at a time. For each: the wall time from add_request to
the step output that carries its first token (async scheduling as served), and the decode steps' wall times.
Usage: [PDLAUNCH_PROMPT_ROWS=off] python benchmarks/turn_ttft.py CHECKPOINT [--new 80] [--context 1536] [--json F]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a tree put there wins
from pdlaunch.engine.llm import build_config  # noqa: E402
from pdlaunch.engine.llm_engine import LLMEngine  # noqa: E402
from pdlaunch.engine.outputs import SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--new", type=int, default=80, help="new tokens of each turn")
    parser.add_argument("--context", type=int, default=1536, help="cached conversation tokens")
    parser.add_argument("--decodes", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run (float32)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    config = build_config(args.checkpoint, args.device, "bfloat16" if cuda else "float32", {
        "max_num_seqs": 64, "max_model_len": 4096 if cuda else 2048, "gpu_memory_utilization": 0.85,
        "enable_prefix_caching": True})
    engine = LLMEngine(config)
    rng = random.Random(0)
    forever = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    try:
        conversation = [rng.randrange(10, 500) for _ in range(args.context)]
        engine.add_request("conversation", conversation, one)
        while engine.has_unfinished_requests():
            engine.step()
        for j in range(args.decodes):
            engine.add_request(f"d{j}", [rng.randrange(10, 500) for _ in range(64)], forever)
        for _ in range(8):
            engine.step()
        ttfts, turn_steps, decode_steps = [], [], []
        for k in range(args.rounds):
            for _ in range(4):  # decode steps between turns
                t0 = time.perf_counter()
                engine.step()
                decode_steps.append((time.perf_counter() - t0) * 1e3)
            rid = f"turn{k}"
            engine.add_request(rid, conversation + [rng.randrange(10, 500) for _ in range(args.new)], one)
            t0 = time.perf_counter()
            while True:
                s0 = time.perf_counter()
                outs = engine.step()
                turn_steps.append((time.perf_counter() - s0) * 1e3)
                if any(o.request_id == rid and o.output_token_ids for o in outs):
                    break
            ttfts.append((time.perf_counter() - t0) * 1e3)
            engine.abort_request(rid)
        doc = {"new": args.new, "context": args.context, "decodes": args.decodes,
               "ttft_ms_p50": statistics.median(ttfts), "ttft_ms": ttfts,
               "decode_step_ms_p50": statistics.median(decode_steps),
               "turn_step_ms_p50": statistics.median(turn_steps)}
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in doc.items() if k != "ttft_ms"}))
        if args.json:
            Path(args.json).write_text(json.dumps(doc))
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
