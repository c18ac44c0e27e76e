"""What the start-up warm-up left to compile: every Triton kernel variant compiled after an engine's warm-up, by
the step that met it, under a multi-turn workload (a shared system prompt, then turns that continue the cached
conversation: prompt chunks over long cached context, alone and several at once), and each step's wall time.

    python benchmarks/warm_compiles.py CKPT [--device cuda] [--json OUT]

A kernel compiled while serving holds every request in that step for the compile (about a second each on a
server's CPU): the warm-up (runner/dry_steps.py) is meant to leave none.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from pdlaunch.engine.llm import build_config
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams


def _install_hook(events: list[dict[str, Any]], step: list[int]) -> None:
    """Record each Triton compile (kernel name and its specialisation key) with the step it happened in."""
    import triton

    def hook(*args: Any, **kwargs: Any) -> None:
        fn = kwargs.get("fn")
        name = getattr(getattr(fn, "fn", fn), "__name__", None) or str(kwargs.get("repr", "?"))[:80]
        events.append({"step": step[0], "kernel": name, "key": str(kwargs.get("key", ""))[:400]})

    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime, "jit_post_compile_hook"):
        knobs.runtime.jit_post_compile_hook = hook
    else:  # older Triton: a class attribute called on every compile
        from triton.runtime.jit import JITFunction
        JITFunction.cache_hook = hook  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--turn-len", type=int, default=64)
    ap.add_argument("--answer-len", type=int, default=64)
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile-first", action="store_true", help="print where the first step's host time goes")
    args = ap.parse_args()

    cfg = build_config(args.model, args.device, "auto", {})
    engine = LLMEngine(cfg)
    events: list[dict[str, Any]] = []
    step = [0]
    _install_hook(events, step)
    rng = random.Random(0)
    vocab = 1000
    system = [rng.randrange(vocab) for _ in range(args.system_len)]
    convs = [list(system) for _ in range(args.conversations)]
    params = SamplingParams(max_tokens=args.answer_len, temperature=0.0, ignore_eos=True)
    walls: list[tuple[int, float, int]] = []
    ids = 0
    # Turn 1 one conversation alone, then all conversations at once, turn after turn.
    for turn, group in enumerate([convs[:1], convs, convs, convs]):
        for conv in group:
            conv.extend(rng.randrange(vocab) for _ in range(args.turn_len + rng.randrange(32)))
            engine.add_request(f"t{turn}-{ids}", list(conv), params)
            ids += 1
        answers: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            if args.profile_first and step[0] == 0:
                import cProfile
                import pstats
                with cProfile.Profile() as prof:
                    outs = engine.step()
                pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
            else:
                outs = engine.step()
            walls.append((step[0], (time.perf_counter() - start) * 1e3, turn))
            step[0] += 1
            for out in outs:
                answers.setdefault(out.request_id, []).extend(out.new_token_ids or [])
        for conv, rid in zip(group, sorted(answers, key=lambda r: int(r.split("-")[1]))):
            conv.extend(answers[rid])
    median = statistics.median(w for _, w, _ in walls)
    slow = [(s, round(w, 1), t) for s, w, t in walls if w > 3 * median + 5]
    print(f"{len(walls)} steps, median {median:.1f} ms; slow steps (step, ms, turn): {slow}")
    print(f"{len(events)} Triton compiles after the warm-up:")
    for e in events:
        print(f"  step {e['step']}: {e['kernel']}  {e['key'][:300]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"compiles": events, "steps": walls, "median_ms": median}, f, indent=1)
    engine.shutdown()


if __name__ == "__main__":
    main()
