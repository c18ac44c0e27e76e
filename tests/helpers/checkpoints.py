"""Tiny random Hugging Face checkpoints for tests, built locally with `transformers`.

Every builder is seeded (same weights every run), saves safetensors through save_pretrained, and
writes the demo tokenizer's files (vocab 512) plus generation_config.json, so the loader sees a
complete checkpoint directory. Norm weights and biases are randomised too, so a loader that drops
one of them fails parity instead of passing by accident.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pdlaunch.model.demo_tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    VOCAB_SIZE,
    generation_config,
    write_tokenizer_files,
)

_TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    # Large init keeps logits well separated so greedy picks are no near-ties.
    "initializer_range": 0.1,
}


def _randomise_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def _save(model: Any, directory: Path, seed: int, max_shard_size: str | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _randomise_norms_and_biases(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    write_tokenizer_files(directory)
    (directory / "generation_config.json").write_text(json.dumps(generation_config(), indent=2) + "\n")
    return directory


def _build(config: Any, seed: int) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def make_llama(
    directory: Path,
    *,
    rope_scaling_llama3: bool = True,
    gqa: bool = True,
    tie: bool = False,
    num_layers: int = 2,
    seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """Llama (3.1-style llama3 rope scaling with a small original context, GQA 4:2)."""
    from transformers import LlamaConfig

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling_llama3:
        # original_max_position_embeddings 64 puts head_dim-16 frequencies in all three regimes
        # (kept, smoothed, divided by factor).
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(
        **_TINY,
        num_hidden_layers=num_layers,
        num_key_value_heads=2 if gqa else 4,
        rope_parameters=rope,
        tie_word_embeddings=tie,
    )
    return _save(_build(config, seed), directory, seed, max_shard_size)


def make_qwen2(directory: Path, *, seed: int = 1, tie: bool = False) -> Path:
    """Qwen2 (qkv bias, GQA), no sliding window."""
    from transformers import Qwen2Config

    config = Qwen2Config(**_TINY, num_hidden_layers=2, num_key_value_heads=2, rope_theta=1000000.0,
                         tie_word_embeddings=tie)
    return _save(_build(config, seed), directory, seed)


def make_mistral(directory: Path, sliding_window: int = 8, *, seed: int = 2) -> Path:
    """Mistral with a sliding window on every layer (tests use prompts longer than the window)."""
    from transformers import MistralConfig

    config = MistralConfig(**_TINY, num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                           sliding_window=sliding_window)
    return _save(_build(config, seed), directory, seed)


def make_qwen2_hybrid(directory: Path, sliding_window: int = 6, *, seed: int = 3) -> Path:
    """Qwen2 with alternating full/sliding layers (`layer_types`), 4 layers."""
    from transformers import Qwen2Config

    config = Qwen2Config(
        **_TINY,
        num_hidden_layers=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=sliding_window,
        max_window_layers=0,
        layer_types=["full_attention", "sliding_attention"] * 2,
    )
    return _save(_build(config, seed), directory, seed)


def make_qwen3(directory: Path, *, seed: int = 5, tie: bool = False, gqa: bool = True,
               sliding_window: int | None = None) -> Path:
    """Qwen3 (per-head q_norm/k_norm, no qkv bias) with head_dim 32 set explicitly (hidden / heads
    is 16), as real Qwen3 configs set it. With `sliding_window`, 4 layers alternate full/sliding."""
    from transformers import Qwen3Config

    window: dict[str, Any] = {}
    if sliding_window is not None:
        window = {"use_sliding_window": True, "sliding_window": sliding_window, "max_window_layers": 0,
                  "layer_types": ["full_attention", "sliding_attention"] * 2}
    config = Qwen3Config(**_TINY, num_hidden_layers=2 if sliding_window is None else 4,
                         num_key_value_heads=2 if gqa else 4, head_dim=32, rope_theta=1000000.0,
                         tie_word_embeddings=tie, **window)
    return _save(_build(config, seed), directory, seed)


def make_llama32(directory: Path, *, seed: int = 6) -> Path:
    """Llama 3.2 shape: tied embeddings, Llama 3.2's llama3 rope scaling, head_dim 64, GQA 4:2.
    The saved checkpoint has no lm_head.weight, like the real Llama-3.2-1B/3B."""
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(**{**_TINY, "hidden_size": 256, "max_position_embeddings": 131072},
                         num_hidden_layers=2, num_key_value_heads=2,
                         rope_parameters=rope, tie_word_embeddings=True)
    return _save(_build(config, seed), directory, seed)


def make_sharded(directory: Path, *, seed: int = 4) -> Path:
    """Llama saved in several safetensors shards with model.safetensors.index.json."""
    return make_llama(directory, num_layers=3, seed=seed, max_shard_size="100KB")


def hf_model(directory: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()


def hf_logits(directory: Path, prompt_ids: list[int], dtype: torch.dtype = torch.float32,
              device: str = "cpu") -> torch.Tensor:
    """HF logits for every prompt position: [len(prompt_ids), vocab] float32 on CPU."""
    model = hf_model(directory, dtype, device)
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids], device=device))
    return out.logits[0].float().cpu()


def hf_greedy(directory: Path, prompt_ids: list[int], max_new_tokens: int, *, stop_at_eos: bool = False,
              dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[int]:
    """transformers greedy generate (do_sample=False); returns only the new token ids.

    By default EOS does not stop generation (compare with `ignore_eos=True` runs), so exactly
    `max_new_tokens` ids come back.
    """
    # A plain argmax loop over the HF forward with its own KV cache: `generate` merges the
    # checkpoint's generation_config (EOS included) into ours under transformers 5.
    model = hf_model(directory, dtype, device)
    input_ids = torch.tensor([prompt_ids], device=device)
    new_ids: list[int] = []
    past = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_id = int(out.logits[0, -1].float().argmax())
            new_ids.append(next_id)
            if stop_at_eos and next_id == EOS_TOKEN_ID:
                break
            input_ids = torch.tensor([[next_id]], device=device)
    return new_ids


# Mixture-of-Experts: 4 experts, top-2, expert width 32 (splits over TP 2; 4 experts split over EP 2).
_MOE: dict[str, Any] = {"num_key_value_heads": 2, "num_experts_per_tok": 2}


def make_qwen3_moe(directory: Path, *, norm_topk_prob: bool = True, seed: int = 21) -> Path:
    """Qwen3-MoE, 3 layers: layer 1 is dense (`mlp_only_layers`), layers 0 and 2 route over 4 experts."""
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(**_TINY, **_MOE, num_hidden_layers=3, head_dim=32, num_experts=4,
                            moe_intermediate_size=32, norm_topk_prob=norm_topk_prob, mlp_only_layers=[1],
                            rope_theta=1000000.0)
    return _save(_build(config, seed), directory, seed)


def make_mixtral(directory: Path, *, seed: int = 20) -> Path:
    """Mixtral (`block_sparse_moe.experts.{e}.w1/w2/w3`), 2 layers, 4 experts of width 32."""
    from transformers import MixtralConfig

    config = MixtralConfig(**{**_TINY, "intermediate_size": 32}, **_MOE, num_hidden_layers=2, num_local_experts=4)
    return _save(_build(config, seed), directory, seed)


def make_qwen2_moe(directory: Path, *, seed: int = 20) -> Path:
    """Qwen2-MoE: qkv bias, 4 experts plus a shared expert gated by sigmoid(shared_expert_gate(x))."""
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(**_TINY, **_MOE, num_hidden_layers=2, num_experts=4, moe_intermediate_size=32,
                            shared_expert_intermediate_size=64, norm_topk_prob=False)
    return _save(_build(config, seed), directory, seed)


def make_olmoe(directory: Path, *, seed: int = 20) -> Path:
    """OLMoE: q/k RMSNorm over the whole projection width, 4 experts of width 32, no renormalisation."""
    from transformers import OlmoeConfig

    config = OlmoeConfig(**{**_TINY, "intermediate_size": 32}, **_MOE, num_hidden_layers=2, num_experts=4)
    return _save(_build(config, seed), directory, seed)


# Seeds chosen so that 32 greedy tokens after the tests' prompts stay clear of EOS (a run that stops
# after two tokens would prove little).
MOE_BUILDERS = {"qwen3_moe": make_qwen3_moe,
                "qwen3_moe_unnormed": lambda d: make_qwen3_moe(d, norm_topk_prob=False),
                "mixtral": make_mixtral, "qwen2_moe": make_qwen2_moe, "olmoe": make_olmoe}
