"""Per-step sampler cost at one batch size: plain greedy, what the new paths add to it when no row
uses them, and the cost of penalties, logit_bias and grammar masks when every row does.

    .venv/bin/python benchmarks/sampler_overhead.py --batch 64 --vocab 49152 [--device cpu|cuda]
        [--tokenizer DIR_WITH_tokenizer.json] [--history 512]

Grammar rows use llguidance with the tokenizer given (its vocabulary sets --vocab) and a JSON
schema; each grammar step fills the masks, applies them and advances every matcher by a token of
a valid document (the engine's per-step grammar work). Times are medians over --steps steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pdlaunch.engine.logits_processors import LogitsProcessors
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.sampler import Sampler, SampleRow
from pdlaunch.engine.structured_output import GrammarBackend, StructuredOutput, advance, apply_grammar_masks

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}


def median_ms(fn: Callable[[], Any], steps: int, device: torch.device) -> float:
    times = []
    for _ in range(steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--history", type=int, default=512, help="output tokens per row the penalties count")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizer", type=Path, default=None, help="directory holding tokenizer.json (grammar case)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(args.batch, args.vocab, generator=gen) * 3).to(device)
    history = torch.randint(0, args.vocab, (args.batch, args.history), generator=gen).tolist()
    prompt = torch.randint(0, args.vocab, (args.batch, args.history), generator=gen).tolist()
    sampler = Sampler(device, eos_token_ids=[0])

    def rows(**kw: Any) -> list[SampleRow]:
        kw.setdefault("temperature", 0.0)
        params = SamplingParams(**kw)
        return [SampleRow(params, None, prompt[i], history[i]) for i in range(args.batch)]

    def timed(batch_rows: list[SampleRow]) -> float:
        return median_ms(lambda: sampler(logits, batch_rows), args.steps, device)

    plain = rows()
    results = {
        "greedy, plain batch (whole sampler)": timed(plain),
        "  of which the new checks (processors + grammar, no row uses them)": median_ms(
            lambda: (LogitsProcessors([0])(logits, plain), apply_grammar_masks(logits, [None] * args.batch)),
            args.steps, device),
        "greedy + repetition/frequency/presence penalties, every row": timed(
            rows(repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5)),
        "greedy + logit_bias (8 ids) every row": timed(rows(logit_bias={i: 5.0 for i in range(8)})),
        "random, temperature 0.8 top_p 0.9": timed(rows(temperature=0.8, top_p=0.9)),
        "random, temperature 0.8 top_p 0.9 min_p 0.05": timed(rows(temperature=0.8, top_p=0.9, min_p=0.05)),
    }
    if args.tokenizer is not None:
        results.update(grammar_case(args, logits, sampler, device))
    print(f"sampler step, batch {args.batch}, vocab {logits.shape[1]}, {device}, median of {args.steps} steps")
    for name, ms in results.items():
        print(f"  {name:70s} {ms:8.2f} ms")


def grammar_case(args: argparse.Namespace, logits: torch.Tensor, sampler: Sampler,
                 device: torch.device) -> dict[str, float]:
    from tokenizers import Tokenizer

    text = (args.tokenizer / "tokenizer.json").read_text()
    tok = Tokenizer.from_str(text)
    vocab = logits.shape[1]
    backend = GrammarBackend(lambda: text, vocab, None)
    spec = StructuredOutput(kind="json", value=json.dumps(SCHEMA))
    doc = tok.encode(json.dumps({"name": "Alice Smith", "age": 42, "tags": ["a", "bb", "ccc"]}, separators=(",", ":")),
                     add_special_tokens=False).ids
    matchers = [backend.matcher(spec) for _ in range(args.batch)]
    params = SamplingParams(temperature=0.0)
    position = [0]

    def step() -> None:
        rows = [SampleRow(params, None, [], [], m) for m in matchers]
        sampler(logits, rows)
        token = doc[position[0] % len(doc)]
        for m in matchers:
            advance(m, token)
        position[0] += 1

    steps = min(args.steps, len(doc) - 1)
    return {f"greedy + JSON-schema grammar every row (llguidance, {steps} steps)": median_ms(step, steps, device)}


if __name__ == "__main__":
    main()
