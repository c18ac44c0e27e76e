"""The shapes `pdlaunch bench make-checkpoint` writes (`SHAPES`): a real model's config.json, and its tensors' HF
names and shapes.

`llama3-8b` (meta-llama/Meta-Llama-3-8B, llama3 rope scaling), `qwen3-30b-a3b` (Qwen/Qwen3-30B-A3B: 48 layers,
128 experts of width 768, top-8, 4 KV heads, per-expert HF tensor names) and `mixtral-8x7b`
(mistralai/Mixtral-8x7B-v0.1: 32 layers, 8 experts of width 14336, top-2, 8 KV heads,
`block_sparse_moe.experts.{e}.w1/w2/w3`). Same tensor names, shapes and config as the real model, so speed
figures are its own.
"""

from __future__ import annotations

from pdlaunch.model.arch import HFConfigJson
from pdlaunch.model.moe.config import MOE_ARCHITECTURES, MoeArch, parse_moe

LLAMA3_8B: HFConfigJson = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_cache": True,
}
QWEN3_30B_A3B: HFConfigJson = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "use_cache": True,
}
MIXTRAL_8X7B: HFConfigJson = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,  # every expert's width
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "router_aux_loss_coef": 0.02,
    "output_router_logits": False,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_cache": True,
}
SHAPES: dict[str, HFConfigJson] = {"llama3-8b": LLAMA3_8B, "qwen3-30b-a3b": QWEN3_30B_A3B,
                                     "mixtral-8x7b": MIXTRAL_8X7B}


def _mlp_shapes(cfg: HFConfigJson, moe: MoeArch | None, p: str, layer: int) -> list[tuple[str, tuple[int, ...]]]:
    """The MLP of one layer: dense gate/up/down, or the router and every expert's three (Qwen3-MoE's
    `mlp.experts.{e}.gate_proj/up_proj/down_proj`, Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2`)."""
    h = cfg["hidden_size"]
    if moe is None or not moe.is_sparse(layer):
        inter = cfg["intermediate_size"]
        return [(f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h)),
                (f"{p}.mlp.down_proj.weight", (h, inter))]
    inter, block = moe.expert_intermediate_size, moe.checkpoint_style
    gate, up, down = ("w1", "w3", "w2") if block == "block_sparse_moe" else ("gate_proj", "up_proj", "down_proj")
    shapes: list[tuple[str, tuple[int, ...]]] = [(f"{p}.{block}.gate.weight", (moe.num_experts, h))]
    for e in range(moe.num_experts):
        shapes += [(f"{p}.{block}.experts.{e}.{gate}.weight", (inter, h)),
                   (f"{p}.{block}.experts.{e}.{up}.weight", (inter, h)),
                   (f"{p}.{block}.experts.{e}.{down}.weight", (h, inter))]
    return shapes


def tensor_shapes(cfg: HFConfigJson) -> list[tuple[str, tuple[int, ...]]]:
    """HF parameter names and shapes (Llama, Qwen3-MoE with its q/k norms and experts, or Mixtral), in file
    order (embedding, layers, norm, head)."""
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    arch = cfg["architectures"][0]
    moe = parse_moe(dict(cfg), arch, cfg["num_hidden_layers"]) if arch in MOE_ARCHITECTURES else None
    head_dim = cfg["head_dim"]
    q_out, kv_out = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (q_out, h)),
            (f"{p}.self_attn.k_proj.weight", (kv_out, h)),
            (f"{p}.self_attn.v_proj.weight", (kv_out, h)),
            (f"{p}.self_attn.o_proj.weight", (h, q_out)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]
        if cfg["architectures"] == ["Qwen3MoeForCausalLM"]:
            shapes += [(f"{p}.self_attn.q_norm.weight", (head_dim,)), (f"{p}.self_attn.k_norm.weight", (head_dim,))]
        shapes += _mlp_shapes(cfg, moe, p, i)
    shapes.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (vocab, h)))
    return shapes
