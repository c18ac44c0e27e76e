"""GGUF files for tests, written with the `gguf` package's writer the way llama.cpp's converter writes
them: q/k rows permuted for llama, the byte-level BPE vocabulary in the metadata, and for llama3 rope
scaling a `rope_freqs` tensor (one divisor per rotary frequency) instead of the scaling parameters."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")

_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# name -> values: change or drop (None) a tensor as it is written, to build a broken file.
Edit = Callable[[str, np.ndarray], np.ndarray | None]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(name: str) -> str:
    base, _, suffix = name.rpartition(".")
    if base in _GLOBAL:
        return f"{_GLOBAL[base]}.{suffix}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}.{suffix}"


def llama_cpp_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """rope_freqs as llama.cpp's convert_hf_to_gguf.py computes them for rope_type llama3 (float32)."""
    base, factor = float(rope["rope_theta"]), float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old = float(rope["original_max_position_embeddings"])
    factors = []
    for k in range(0, head_dim, 2):
        freq = float(np.float32(1.0) / np.float32(base) ** np.float32(k / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_tokenizer(writer: Any, hf_dir: Path, cfg: dict[str, Any], pre: str | None) -> None:
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [specials.get(i, text) for i, (text, _) in enumerate(vocab)]
    tokens += [specials[i] for i in sorted(specials) if i >= len(tokens)]
    writer.add_tokenizer_model("gpt2")
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    merges = tok["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}")


def write_gguf(hf_dir: Path, out: Path, arch: str, quant: str = "F32", *, tokenizer: bool = True,
               edit: Edit | None = None, rope_metadata: bool = False, raw_types: dict[str, str] | None = None,
               extra: dict[str, np.ndarray] | None = None, pre: str | None = None,
               add_tokenizer: Callable[[Any], None] | None = None,
               extra_metadata: Callable[[Any], None] | None = None) -> Path:
    """A GGUF file of the HF checkpoint `hf_dir` (weights as `quant`: 2-D weights only are quantized).
    A llama3-scaled checkpoint gets `rope_freqs`; `rope_metadata` also writes rope.scaling.factor and
    rope.scaling.original_context_length (llama.cpp's converter does not). `raw_types` stores the named
    tensors as zero bytes of another ggml type (one the gguf package may not dequantize). `add_tokenizer`
    writes the tokenizer metadata instead of the byte-level BPE of `hf_dir` (gguf_spm_files.py); `extra_metadata`
    writes more keys (a rope scaling type, say)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0)}
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if extra_metadata is not None:
        extra_metadata(writer)
    if add_tokenizer is not None:
        add_tokenizer(writer)
    elif tokenizer:
        _add_tokenizer(writer, hf_dir, cfg, pre)
    tensors = {_gguf_name(n): t.float().numpy() for n, t in load_file(str(hf_dir / "model.safetensors")).items()}
    if rope.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = llama_cpp_rope_factors(rope, head_dim)
        if rope_metadata:
            writer.add_rope_scaling_factor(float(rope["factor"]))
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    tensors |= extra or {}
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for name, values in tensors.items():
        if arch == "llama" and name.endswith("attn_q.weight"):
            values = _permute(values, heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            values = _permute(values, kv_heads)
        edited = values if edit is None else edit(name, values)
        if edited is None:
            continue
        if raw_types and name in raw_types:
            qtype = getattr(gguf.GGMLQuantizationType, raw_types[name])
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((*edited.shape[:-1], edited.shape[-1] // block * size), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=qtype)
        elif quant != "F32" and edited.ndim == 2:
            qtype = getattr(gguf.GGMLQuantizationType, quant)
            writer.add_tensor(name, gguf.quants.quantize(edited, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, edited)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
