"""GGUF checkpoints: read with the `gguf` package, dequantize, and write a local HF-format directory.

`convert_gguf(file, out_dir)` writes config.json (transformers 5 layout: `rope_parameters`),
model.safetensors (weights dequantized to the serving dtype), tokenizer.json rebuilt from the GGUF
vocabulary (byte-level BPE or SentencePiece: tokenizer.py),
tokenizer_config.json and chat_template.jinja. The engine then loads it like any checkpoint, so every
path (TP, PD, CUDA graphs) works unchanged. Architectures: llama (Llama, Mistral, SmolLM), qwen2, qwen3.
The header is read and checked first (metadata.py, check.py): a file with a missing tensor, a
wrong shape or no tokenizer is refused before any weight is dequantized. llama3 rope scaling comes back
from the `rope_freqs` tensor (rope.py).
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
from pdlaunch.model.gguf.check import gguf_problems
from pdlaunch.model.gguf.metadata import ROPE_FREQS, dequantized, hf_config, open_reader, value
from pdlaunch.model.gguf.tokenizer import tokenizer_config, tokenizer_json

# GGUF per-block tensor -> HF name under model.layers.{i}.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (it interleaves each head's rotary halves for its rope kernel)."""
    rows = weight.shape[0]  # [heads * head_dim, in]; GGUF order per head: [head_dim/2, 2], HF: [2, head_dim/2]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_tensors(reader: Any, config: dict[str, Any], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, dequantized tensor) for every weight of the file (rope_freqs is in config.json instead)."""
    arch = value(reader, "general.architecture")
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue
        base, _, suffix = tensor.name.rpartition(".")  # suffix: weight | bias
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
            kind = parts[2]
        elif base in _GLOBAL_NAMES:
            name, kind = f"{_GLOBAL_NAMES[base]}.{suffix}", base
        else:
            raise PdlaunchError(f"GGUF tensor {tensor.name!r} has no place in a {arch} model", field="model.path",
                                hint="the file holds an architecture variant pdlaunch does not load")
        values = dequantized(tensor)
        if arch == "llama" and kind == "attn_q":
            values = _unpermute(values, config["num_attention_heads"])
        elif arch == "llama" and kind == "attn_k":
            values = _unpermute(values, config["num_key_value_heads"])
        yield name, torch.from_numpy(np.array(values, dtype=np.float32, order="C", copy=True)).to(dtype)


def convert_gguf(path: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write the HF-format checkpoint of the GGUF file `path` into the existing directory `out_dir`."""
    from safetensors.torch import save_file

    reader = open_reader(path)
    problems = gguf_problems(reader)
    if problems:  # the first one, as check-config words it (check-config lists them all)
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s): run pdlaunch check-config)" if len(problems) > 1 else ""
        raise PdlaunchError(f"{path.name}: {first.message}{more}", field="model.path", hint=first.hint)
    config = hf_config(reader)
    config["dtype"] = str(dtype).removeprefix("torch.")
    tensors = dict(hf_tensors(reader, config, dtype))
    if config["tie_word_embeddings"]:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json(reader), ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(reader), indent=2) + "\n")
    template = value(reader, "tokenizer.chat_template")
    if template:
        (out_dir / "chat_template.jinja").write_text(template)
    ids = {"eos_token_id": value(reader, "tokenizer.ggml.eos_token_id"),
           "bos_token_id": value(reader, "tokenizer.ggml.bos_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")


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
