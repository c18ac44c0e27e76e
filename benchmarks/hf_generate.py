"""Baseline: HF transformers `generate` decode speed on the same GPU, for the batch-64 comparison.

    python benchmarks/hf_generate.py CKPT_DIR [--batch 1 64] [--prompt-len 128] [--new-tokens 128]
        [--prefill-len 4096] [--json OUT]

Greedy, bf16, default (dynamic) KV cache, eager attention kernels as transformers picks them; the
prompts are random token ids of one length (no padding) and `min_new_tokens` forces every sequence
to the full length. Decode step time = (t(N new tokens) - t(1 new token)) / (N - 1), which takes the
prefill out; decode throughput = batch / step time. `--prefill-len T` also times one forward pass
of a single T-token prompt (logits of the last position only), the HF reference for prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def timed_generate(model: Any, ids: torch.Tensor, new_tokens: int, repeat: int) -> float:
    """Median seconds of one generate() call producing exactly `new_tokens` tokens per sequence."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}")
    return statistics.median(times)


def timed_prefill(model: Any, num_tokens: int, repeat: int = 5) -> float:
    """Median milliseconds of one forward pass over a [1, num_tokens] prompt, no KV cache kept."""
    ids = torch.randint(10, 500, (1, num_tokens), generator=torch.Generator().manual_seed(1)).cuda()
    times = []
    with torch.inference_mode():
        for i in range(repeat + 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--prefill-len", type=int, default=0, help="also time a T-token prefill (0: skip)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16, device_map="cuda")
    model.eval()
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batch:
        ids = torch.randint(10, 500, (batch, args.prompt_len), generator=gen).cuda()
        timed_generate(model, ids, 4, 1)  # warm-up: kernels, allocator
        t_one = timed_generate(model, ids, 1, args.repeat)
        t_all = timed_generate(model, ids, args.new_tokens, args.repeat)
        step_ms = (t_all - t_one) / (args.new_tokens - 1) * 1e3
        rows.append({"batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "prefill_plus_one_ms": t_one * 1e3, "decode_step_ms": step_ms,
                     "decode_tokens_per_s": batch / step_ms * 1e3})
        print(f"HF generate batch {batch}: decode step {step_ms:.2f} ms, {batch / step_ms * 1e3:.0f} tok/s "
              f"(prefill {args.prompt_len} + 1 token: {t_one * 1e3:.1f} ms)", flush=True)
    prefill_ms = timed_prefill(model, args.prefill_len) if args.prefill_len else None
    if prefill_ms is not None:
        print(f"HF forward of one {args.prefill_len}-token prompt: {prefill_ms:.1f} ms", flush=True)
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "transformers": transformers.__version__, "checkpoint": str(args.checkpoint), "load_s": load_s,
           "rows": rows, "prefill_len": args.prefill_len, "prefill_ms": prefill_ms}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
