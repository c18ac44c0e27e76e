"""GGUF checkpoints: read with the `gguf` package, dequantize, and write a local HF-format directory.

`convert_gguf(file, out_dir)` writes config.json (transformers 5 layout: `rope_parameters`),
model.safetensors (weights dequantized to the serving dtype), tokenizer.json rebuilt from the GGUF
vocabulary (byte-level BPE, as transformers' own GGUF tokenizer converter builds it),
tokenizer_config.json and chat_template.jinja. The engine then loads it like any checkpoint, so every
path (TP, PD, CUDA graphs) works unchanged. Architectures: llama (Llama, Mistral, SmolLM), qwen2, qwen3.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pdlaunch.errors import PdlaunchError

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
_HF_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
            "qwen3": ("Qwen3ForCausalLM", "qwen3")}
# GGUF per-block tensor -> HF name under model.layers.{i}.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types that are added (special) tokens


def open_reader(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:  # gguf raises bare ValueError for bad magic
        raise PdlaunchError(f"{path} is not a readable GGUF file: {exc}", field="model.path",
                            hint="pass an intact .gguf file (re-download it) or an HF checkpoint directory") from exc


def _value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def unreadable_quant_types(reader: Any) -> list[str]:
    """Quantization types in the file that the installed `gguf` package cannot dequantize."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits  # the package's registry of dequantizers

    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    missing = {t.tensor_type.name for t in reader.tensors
               if t.tensor_type not in plain and t.tensor_type not in _type_traits}
    return sorted(missing)


def hf_config(reader: Any) -> dict[str, Any]:
    """config.json (transformers 5 layout) from the GGUF metadata. Raises PdlaunchError naming what is missing."""
    arch = _value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise PdlaunchError(f"GGUF architecture {arch!r} is not supported", field="model.path",
                            hint=f"pdlaunch reads GGUF files of these architectures: {', '.join(SUPPORTED_ARCHS)}")

    def need(key: str) -> Any:
        value = _value(reader, f"{arch}.{key}")
        if value is None:
            raise PdlaunchError(f"GGUF metadata lacks {arch}.{key}", field="model.path",
                                hint="the file is incomplete or was written by an unknown converter")
        return value

    heads, hidden = int(need("attention.head_count")), int(need("embedding_length"))
    head_dim = int(_value(reader, f"{arch}.attention.key_length", hidden // heads))
    tensor_names = {t.name for t in reader.tensors}
    vocab = len(_value(reader, "tokenizer.ggml.tokens", []) or []) or int(need("vocab_size"))
    hf_arch, model_type = _HF_ARCH[arch]
    config: dict[str, Any] = {
        "architectures": [hf_arch], "model_type": model_type,
        "hidden_size": hidden, "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_value(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim, "intermediate_size": int(need("feed_forward_length")), "vocab_size": vocab,
        "max_position_embeddings": int(need("context_length")),
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": float(_value(reader, f"{arch}.rope.freq_base", 10000.0))},
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")), "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names, "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _value(reader, "tokenizer.ggml.eos_token_id"), "dtype": "float32",
    }
    window = _value(reader, f"{arch}.attention.sliding_window")
    if window:
        config["sliding_window"] = int(window)
    return config


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (it interleaves each head's rotary halves for its rope kernel)."""
    rows = weight.shape[0]  # [heads * head_dim, in]; GGUF order per head: [head_dim/2, 2], HF: [2, head_dim/2]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_tensors(reader: Any, config: dict[str, Any], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, dequantized tensor) for every tensor of the file."""
    from gguf.quants import dequantize

    arch = _value(reader, "general.architecture")
    for tensor in reader.tensors:
        base, _, suffix = tensor.name.rpartition(".")  # suffix: weight | bias
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
            kind = parts[2]
        elif base in _GLOBAL_NAMES:
            name, kind = f"{_GLOBAL_NAMES[base]}.{suffix}", base
        else:
            if base == "rope_freqs":  # per-frequency factors: the llama3 parameters behind them are not stored
                raise PdlaunchError("GGUF files with llama3 rope scaling (rope_freqs) are not supported yet",
                                    field="model.path", hint="use the model's HF checkpoint directory instead")
            raise PdlaunchError(f"GGUF tensor {tensor.name!r} has no place in a {arch} model", field="model.path",
                                hint="the file holds an architecture variant pdlaunch does not load")
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        values = values.reshape(tuple(int(n) for n in reversed(tensor.shape)))  # GGUF lists dims innermost first
        if arch == "llama" and kind == "attn_q":
            values = _unpermute(values, config["num_attention_heads"])
        elif arch == "llama" and kind == "attn_k":
            values = _unpermute(values, config["num_key_value_heads"])
        yield name, torch.from_numpy(np.array(values, dtype=np.float32, order="C", copy=True)).to(dtype)


def tokenizer_json(reader: Any) -> dict[str, Any]:
    """tokenizer.json for a byte-level BPE vocabulary (tokenizer.ggml.model == "gpt2")."""
    model = _value(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise PdlaunchError(f"GGUF tokenizer model {model!r} is not supported", field="model.path",
                            hint="pdlaunch rebuilds byte-level BPE (gpt2-style) tokenizers from GGUF metadata; "
                                 "use an HF checkpoint directory with tokenizer.json for this model")
    tokens: list[str] = list(_value(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges: list[str] = list(_value(reader, "tokenizer.ggml.merges", []))
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": None, "decoder": {**byte_level, "add_prefix_space": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)}, "merges": merges},
    }


def tokenizer_config(reader: Any) -> dict[str, Any]:
    tokens = list(_value(reader, "tokenizer.ggml.tokens"))

    def token(key: str) -> str | None:
        index = _value(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    return {"bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding"),
            "unk_token": token("unknown"), "add_bos_token": bool(_value(reader, "tokenizer.ggml.add_bos_token", False)),
            "model_max_length": int(_value(reader, f"{_value(reader, 'general.architecture')}.context_length", 0))}


def convert_gguf(path: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write the HF-format checkpoint of the GGUF file `path` into the existing directory `out_dir`."""
    from safetensors.torch import save_file

    reader = open_reader(path)
    missing = unreadable_quant_types(reader)
    if missing:
        raise PdlaunchError(f"{path.name} uses quantization types the gguf package cannot dequantize: "
                            f"{', '.join(missing)}", field="model.path",
                            hint="upgrade the gguf package (pip install -U gguf) or use a file with other quant types")
    config = hf_config(reader)
    config["dtype"] = str(dtype).removeprefix("torch.")
    tensors = dict(hf_tensors(reader, config, dtype))
    if config["tie_word_embeddings"]:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json(reader), ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(reader), indent=2) + "\n")
    template = _value(reader, "tokenizer.chat_template")
    if template:
        (out_dir / "chat_template.jinja").write_text(template)
    eos = _value(reader, "tokenizer.ggml.eos_token_id")
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": _value(
        reader, "tokenizer.ggml.bos_token_id")}, indent=2) + "\n")


def ensure_converted(path: Path, cache_root: Path) -> Path:
    """The HF-format directory of the GGUF file `path`, converted once into `cache_root/gguf/`.

    Keyed by the file's resolved path, size and mtime: a replaced file converts again."""
    path = path.expanduser().resolve()
    try:
        stat = path.stat()
    except OSError as exc:
        raise PdlaunchError(f"cannot read {path}: {exc.strerror or exc}", field="model.path",
                            hint="pass an existing .gguf file or an HF checkpoint directory") from exc
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    final = cache_root / "gguf" / f"{path.stem}-{key}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        tmp.chmod(0o755)
        convert_gguf(path, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # else a concurrent converter finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
