"""What a GGUF file must hold before it converts: every tensor its architecture needs, with the shape its
metadata implies, a tokenizer we can build, and quant types the `gguf` package can dequantize.

`gguf_problems(reader)` reads the header only (plus the small rope_freqs tensor); check-config reports
every problem, and the conversion refuses the file with the same messages before dequantizing anything.
"""

from __future__ import annotations

import json
from typing import Any

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.gguf.metadata import ROPE_FREQS, hf_config, hf_shape, unreadable_quant_types, value
from pdlaunch.model.gguf.tokenizer import tokenizer_json

MAX_TENSOR_PROBLEMS = 5  # a file of another model would otherwise give one line per tensor
_SHAPE_HINT = "the file's tensors do not match its metadata: re-convert or re-download it"


def _expected(config: dict[str, Any], arch: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(GGUF tensor name -> HF-order shape the metadata implies, name -> metadata keys behind that shape)."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]
    why_q = f"{arch}.attention.head_count x {arch}.attention.key_length, {arch}.embedding_length"
    why_kv = f"{arch}.attention.head_count_kv x {arch}.attention.key_length, {arch}.embedding_length"
    why_ffn = f"{arch}.feed_forward_length, {arch}.embedding_length"
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    why = {"token_embd.weight": f"vocabulary {vocab}, {arch}.embedding_length",
           "output_norm.weight": f"{arch}.embedding_length"}
    if not config["tie_word_embeddings"]:
        shapes["output.weight"], why["output.weight"] = (vocab, hidden), why["token_embd.weight"]
    layer: dict[str, tuple[tuple[int, ...], str]] = {
        "attn_norm.weight": ((hidden,), f"{arch}.embedding_length"),
        "ffn_norm.weight": ((hidden,), f"{arch}.embedding_length"),
        "attn_q.weight": ((q_out, hidden), why_q), "attn_k.weight": ((kv_out, hidden), why_kv),
        "attn_v.weight": ((kv_out, hidden), why_kv), "attn_output.weight": ((hidden, q_out), why_q),
        "ffn_gate.weight": ((inter, hidden), why_ffn), "ffn_up.weight": ((inter, hidden), why_ffn),
        "ffn_down.weight": ((hidden, inter), why_ffn),
    }
    if arch == "qwen2" or config["attention_bias"]:
        layer |= {"attn_q.bias": ((q_out,), why_q), "attn_k.bias": ((kv_out,), why_kv),
                  "attn_v.bias": ((kv_out,), why_kv)}
    if arch == "llama" and config["attention_bias"]:
        layer["attn_output.bias"] = ((hidden,), f"{arch}.embedding_length")
    if arch == "qwen3":
        why_norm = f"{arch}.attention.key_length"
        layer |= {"attn_q_norm.weight": ((config["head_dim"],), why_norm),
                  "attn_k_norm.weight": ((config["head_dim"],), why_norm)}
    for i in range(config["num_hidden_layers"]):
        for name, (shape, reason) in layer.items():
            shapes[f"blk.{i}.{name}"], why[f"blk.{i}.{name}"] = shape, reason
    return shapes, why


def _tensor_problems(reader: Any, config: dict[str, Any], arch: str) -> list[PdlaunchError]:
    expected, why = _expected(config, arch)
    optional = {"output.weight", ROPE_FREQS}  # a tied model may still ship output.weight; rope_freqs: llama3 rope
    found: list[PdlaunchError] = []
    for gguf_tensor in reader.tensors:
        name, shape = gguf_tensor.name, hf_shape(gguf_tensor)
        if name not in expected:
            if name not in optional:
                found.append(PdlaunchError(f"GGUF tensor {name!r} has no place in a {arch} model",
                                           field="model.path", hint="the file holds an architecture variant "
                                           "pdlaunch does not load; use the model's HF checkpoint directory"))
        elif shape != expected[name]:
            found.append(PdlaunchError(f"GGUF tensor {name!r} has shape {shape}, the metadata ({why[name]}) "
                                       f"implies {expected[name]}", field="model.path", hint=_SHAPE_HINT))
    present = {t.name for t in reader.tensors}
    missing = [name for name in expected if name not in present]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        found.append(PdlaunchError(f"GGUF file lacks tensor(s) {', '.join(missing[:3])}{more} that a "
                                   f"{config['num_hidden_layers']}-layer {arch} model needs", field="model.path",
                                   hint="the file is truncated or incomplete: re-download or re-convert it"))
    if len(found) > MAX_TENSOR_PROBLEMS:
        more_problems = len(found) - MAX_TENSOR_PROBLEMS
        found = found[:MAX_TENSOR_PROBLEMS] + [PdlaunchError(f"{more_problems} more GGUF tensor problem(s)",
                                                             field="model.path", hint=_SHAPE_HINT)]
    return found


def _tokenizer_problems(reader: Any, vocab: int) -> list[PdlaunchError]:
    from tokenizers import Tokenizer

    try:
        built = tokenizer_json(reader)
        Tokenizer.from_str(json.dumps(built))
    except PdlaunchError as exc:
        return [exc]
    except Exception as exc:  # tokenizers raises its own untyped Exception for a vocabulary it cannot build
        return [PdlaunchError(f"the tokenizer in the GGUF metadata does not build: {exc}", field="model.path",
                              hint="the file's tokenizer.ggml.* entries are damaged: re-download or re-convert it")]
    count = len(built["model"]["vocab"])
    if count > vocab:
        return [PdlaunchError(f"the GGUF tokenizer has {count} tokens but token_embd.weight has {vocab} rows",
                              field="model.path", hint="the tokenizer does not belong to these weights")]
    return []


def gguf_problems(reader: Any) -> list[PdlaunchError]:
    """Everything that would stop this GGUF file from converting and loading, one error per problem."""
    problems: list[PdlaunchError] = []
    missing = unreadable_quant_types(reader)
    if missing:
        problems.append(PdlaunchError(f"the GGUF file uses quantization types the installed gguf package cannot "
                                      f"dequantize: {', '.join(missing)}", field="model.path",
                                      hint="upgrade the gguf package (pip install -U gguf) or use a file with "
                                           "other quantization types (F16, BF16, Q8_0, Q4_K, ...)"))
    try:
        config = hf_config(reader)
    except PdlaunchError as exc:
        return problems + [exc]
    arch = str(value(reader, "general.architecture"))
    return problems + _tensor_problems(reader, config, arch) + _tokenizer_problems(reader, config["vocab_size"])
