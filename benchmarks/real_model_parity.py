"""Greedy token ids of pdlaunch's engine against transformers on one model, prompt by prompt.

    python benchmarks/real_model_parity.py MODEL [--prompts 6] [--tokens 32] [--device cuda] [--dtype bfloat16]
    python benchmarks/real_model_parity.py --random qwen3|llama32 --out DIR [the same options]
    python benchmarks/real_model_parity.py FILE.gguf --convert-to DIR      (then run it on DIR elsewhere)

MODEL is a checkpoint directory, a FILE.gguf (converted once into the cache; needs the `gguf` package) or
`demo` (SmolLM2-135M-Instruct, from the cache `make demo-model` fills). `--random` first builds a random
checkpoint with realistic head dims (hidden 1024, 16 heads, 8 KV heads, head_dim 128, 4 layers; Qwen3 with
q/k norms, or Llama 3.2 with tied embeddings and llama3 rope scaling) into DIR, once.

Both sides get the same prompt ids. transformers runs first (a plain argmax loop over its forward with its
KV cache, in --dtype on --device) and is freed; then our engine runs all prompts as a batch, as served
(CUDA graphs unless --enforce-eager). Each prompt prints whether its --tokens ids match and where they first
diverge; the last line is "K of N prompts match for T tokens". Exit 0 when the comparison ran (--strict:
only when every prompt matches), 1 on an error. Needs torch, transformers, safetensors, tokenizers, numpy,
pydantic and pdlaunch; on CPU use `--device cpu --dtype float32`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.tokenizer import Tokenizer

PROMPTS = [
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog. Then the dog",
    "Write a short poem about the sea.",
    "In 1969, the first humans landed on",
    "def fibonacci(n):",
    "The three primary colors are",
    "Once upon a time, in a small village by the mountains,",
    "Explain why the sky is blue in one sentence.",
]
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    # realistic per-head shapes; vocabulary of the demo tokenizer (512) so every id detokenizes
    "realistic": {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                  "num_hidden_layers": 4, "intermediate_size": 3072},
    "tiny": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
             "num_hidden_layers": 2, "intermediate_size": 128},
}
INIT_RANGE = 0.05  # wider than transformers' 0.02: random logits with clear argmaxes, not near-ties


class PromptResult(BaseModel):
    prompt: str
    prompt_tokens: int
    ours: list[int]
    transformers: list[int]
    match: bool
    first_divergence: int | None  # index into the generated ids


class ParityReport(BaseModel):
    model: str
    device: str
    dtype: str
    cuda_graphs: bool
    tokens: int
    matched: int
    results: list[PromptResult]


def build_random(kind: Literal["qwen3", "llama32"], out: Path, size: str, seed: int = 0) -> Path:
    """A seeded random checkpoint of `kind` in `out` (kept: a second run reuses it)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from pdlaunch.model import demo_tokenizer

    common = {**RANDOM_SHAPES[size], "vocab_size": demo_tokenizer.VOCAB_SIZE, "rms_norm_eps": 1e-6,
              "bos_token_id": demo_tokenizer.BOS_TOKEN_ID, "eos_token_id": demo_tokenizer.EOS_TOKEN_ID,
              "initializer_range": INIT_RANGE}
    if kind == "qwen3":
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 1000000.0}
        config: Any = Qwen3Config(**common, **_rope_kwargs(rope), max_position_embeddings=40960,
                                  tie_word_embeddings=False)
    else:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        config = LlamaConfig(**common, **_rope_kwargs(rope), max_position_embeddings=131072, tie_word_embeddings=True)
    torch.manual_seed(seed)
    # from_config is untyped in transformers
    model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norms away from 1, so a loader that drops one cannot match by accident
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    demo_tokenizer.write_tokenizer_files(out)
    (out / "generation_config.json").write_text(json.dumps(demo_tokenizer.generation_config(), indent=2) + "\n")
    return out


def _rope_kwargs(rope: dict[str, Any]) -> dict[str, Any]:
    """Config kwargs for `rope` in the installed transformers' layout (5.x: rope_parameters; 4.x: rope_theta
    and rope_scaling), so the saved config.json and the model built from it agree on either version."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": rope}
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {"rope_theta": rope["rope_theta"], "rope_scaling": None if scaling["rope_type"] == "default" else scaling}


def model_directory(model: str) -> Path:
    """The HF-format directory both sides load: a directory as given, `demo`, or a GGUF file converted once."""
    from pdlaunch.model.demo import is_gguf, resolve_model_path

    if is_gguf(model) and importlib.util.find_spec("gguf") is None:
        raise PdlaunchError(f"cannot convert {model}: the gguf package is not installed here", field="model",
                            hint="on a machine with `pip install gguf` run `python benchmarks/real_model_parity.py "
                            "FILE.gguf --convert-to DIR`, copy DIR here and pass it")
    return resolve_model_path(model, say=lambda text: print(text, file=sys.stderr))


def _transformers_model(model_dir: Path, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    rope = json.loads((model_dir / "config.json").read_text()).get("rope_parameters")
    if isinstance(rope, dict) and not getattr(config, "rope_parameters", None):
        # transformers 4.x reads rope_theta + rope_scaling; our GGUF conversion writes the 5.x layout
        config.rope_theta = rope.get("rope_theta", 10000.0)
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        config.rope_scaling = None if scaling.get("rope_type") == "default" else scaling
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype)
    return model.to(device).eval()


def transformers_greedy(model_dir: Path, prompts: list[list[int]], tokens: int, device: str,
                        dtype: torch.dtype) -> list[list[int]]:
    """Greedy ids, one prompt at a time: argmax over transformers' forward with its own KV cache."""
    model = _transformers_model(model_dir, device, dtype)
    results = []
    with torch.inference_mode():
        for prompt in prompts:
            ids, past, new = torch.tensor([prompt], device=device), None, []
            for _ in range(tokens):
                out = model(input_ids=ids, past_key_values=past, use_cache=True)
                past, next_id = out.past_key_values, int(out.logits[0, -1].float().argmax())
                new.append(next_id)
                ids = torch.tensor([[next_id]], device=device)
            results.append(new)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def engine_greedy(model_dir: Path, prompts: list[list[int]], tokens: int, device: str, dtype: str,
                  enforce_eager: bool) -> list[list[int]]:
    """Greedy ids from our engine: every prompt in one batch, as a served instance runs them."""
    from pdlaunch.engine.llm import LLM
    from pdlaunch.engine.outputs import SamplingParams

    options: dict[str, Any] = {"enforce_eager": enforce_eager}
    if device == "cpu":  # room for every sequence; the CPU has no memory profile to size the cache from
        options["num_gpu_blocks"] = len(prompts) * ((max(map(len, prompts)) + tokens) // 16 + 2)
    with LLM(str(model_dir), device=device, dtype=dtype, **options) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    return [list(o.token_ids) for o in outs]


def compare(texts: list[str], prompts: list[list[int]], ours: list[list[int]],
            theirs: list[list[int]]) -> list[PromptResult]:
    results = []
    for text, prompt, a, b in zip(texts, prompts, ours, theirs):
        diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if diverge is None and len(a) != len(b):
            diverge = min(len(a), len(b))
        results.append(PromptResult(prompt=text, prompt_tokens=len(prompt), ours=a, transformers=b,
                                    match=diverge is None, first_divergence=diverge))
    return results


def run(args: argparse.Namespace) -> ParityReport:
    if args.random:
        if args.out is None:
            raise PdlaunchError("--random needs --out DIR", field="--out", hint="name a directory for the checkpoint")
        model_dir = build_random(args.random, args.out, args.size)
    elif args.model:
        model_dir = model_directory(args.model)
    else:
        raise PdlaunchError("no model given", field="model", hint="pass MODEL (directory, FILE.gguf, demo) or --random")
    texts = args.prompt or PROMPTS[: args.prompts]
    tokenizer = Tokenizer(model_dir)
    prompts = [tokenizer.encode(text) for text in texts]
    dtype = getattr(torch, args.dtype)
    theirs = transformers_greedy(model_dir, prompts, args.tokens, args.device, dtype)
    ours = engine_greedy(model_dir, prompts, args.tokens, args.device, args.dtype, args.enforce_eager)
    results = compare(texts, prompts, ours, theirs)
    for i, r in enumerate(results):
        if r.match:
            print(f"prompt {i}: match ({args.tokens} tokens)  {r.prompt!r}")
        else:
            at = r.first_divergence or 0
            pair = (r.ours[at:at + 1], r.transformers[at:at + 1])
            print(f"prompt {i}: DIVERGES at token {at} (ours {pair[0]} {tokenizer.decode(pair[0])!r}, "
                  f"transformers {pair[1]} {tokenizer.decode(pair[1])!r})  {r.prompt!r}")
    report = ParityReport(model=str(model_dir), device=args.device, dtype=args.dtype,
                          cuda_graphs=args.device.startswith("cuda") and not args.enforce_eager, tokens=args.tokens,
                          matched=sum(r.match for r in results), results=results)
    print(f"{report.matched} of {len(results)} prompts match for {args.tokens} tokens "
          f"({args.device}, {args.dtype}, {'CUDA graphs' if report.cuda_graphs else 'eager'}, {model_dir})")
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="checkpoint directory, FILE.gguf or demo")
    p.add_argument("--random", choices=["qwen3", "llama32"], help="build a random checkpoint into --out first")
    p.add_argument("--out", type=Path, help="directory for --random (reused when it holds a checkpoint)")
    p.add_argument("--size", choices=sorted(RANDOM_SHAPES), default="realistic", help="shape of --random")
    p.add_argument("--convert-to", type=Path, help="with FILE.gguf: write its HF-format directory here and stop")
    p.add_argument("--prompts", type=int, default=6, help=f"how many built-in prompts (at most {len(PROMPTS)})")
    p.add_argument("--prompt", action="append", help="a prompt of your own (repeatable; replaces the built-ins)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--device", default="cuda", help="cuda | cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--enforce-eager", action="store_true", help="our engine without CUDA graphs")
    p.add_argument("--strict", action="store_true", help="exit 1 unless every prompt matches")
    p.add_argument("--json", type=Path, help="write the report (ids included) here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.convert_to is not None:
            from pdlaunch.model.gguf.convert import convert_gguf

            args.convert_to.mkdir(parents=True, exist_ok=True)
            convert_gguf(Path(args.model), args.convert_to)
            print(f"converted {args.model} into {args.convert_to}")
            return 0
        if not 1 <= args.prompts <= len(PROMPTS) or args.tokens < 1:
            raise PdlaunchError(f"--prompts must be 1..{len(PROMPTS)} and --tokens at least 1", field="--prompts",
                                hint="or pass your own prompts with --prompt TEXT")
        report = run(args)
    except PdlaunchError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return 1
    if args.json is not None:
        args.json.write_text(report.model_dump_json(indent=2) + "\n")
    return 1 if args.strict and report.matched < len(report.results) else 0


if __name__ == "__main__":
    sys.exit(main())
