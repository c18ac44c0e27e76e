"""A GGUF file's header: open it, read its metadata, and derive the HF config.json it stands for.

Only the header and the small `rope_freqs` tensor are read here (the file is memory-mapped), so
check-config can use it without dequantizing any weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from typing_extensions import NotRequired, TypedDict

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.gguf.rope import RopeParameters, llama3_rope_parameters

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
_HF_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
            "qwen3": ("Qwen3ForCausalLM", "qwen3")}
ROPE_FREQS = "rope_freqs.weight"


class HFConfig(TypedDict):
    """The config.json a GGUF file stands for (transformers 5 layout), as hf_config derives it."""

    architectures: list[str]
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_parameters: RopeParameters
    rms_norm_eps: float
    hidden_act: str
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    dtype: str
    sliding_window: NotRequired[int]


def open_reader(path: Path) -> GGUFReader:
    try:
        from gguf import GGUFReader
    except ModuleNotFoundError:
        raise PdlaunchError(f"reading {path.name} needs the gguf package, which is not installed",
                            field="model.path", hint="pip install gguf, or convert the file where it is installed "
                            "and pass the converted HF-format directory") from None

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:  # gguf raises bare ValueError for bad magic
        # Past the magic, gguf's own words are Python's (`not enough values to unpack`) for a header cut short.
        why = str(exc) if "magic" in str(exc) or isinstance(exc, OSError) else \
            f"its header does not parse ({exc}): a truncated or damaged file"
        raise PdlaunchError(f"{path} is not a readable GGUF file: {why}", field="model.path",
                            hint="pass an intact .gguf file (re-download it) or an HF checkpoint directory") from exc


def value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """The metadata field's contents (a scalar, a string or a list, as the gguf package decodes it)."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def tensor(reader: GGUFReader, name: str) -> ReaderTensor | None:
    return next((t for t in reader.tensors if t.name == name), None)


def hf_shape(gguf_tensor: ReaderTensor) -> tuple[int, ...]:
    """The tensor's shape in HF (row-major) order: GGUF lists dims innermost first."""
    return tuple(int(n) for n in reversed(gguf_tensor.shape))


def dequantized(gguf_tensor: ReaderTensor) -> np.ndarray:
    """float32 values in HF shape."""
    from gguf.quants import dequantize

    values = np.asarray(dequantize(gguf_tensor.data, gguf_tensor.tensor_type), dtype=np.float32)
    return values.reshape(hf_shape(gguf_tensor))


def unreadable_quant_types(reader: GGUFReader) -> list[str]:
    """Quantization types in the file that the installed `gguf` package cannot dequantize."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits  # the package's registry of dequantizers

    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    missing = {t.tensor_type.name for t in reader.tensors
               if t.tensor_type not in plain and t.tensor_type not in _type_traits}
    return sorted(missing)


def architecture(reader: GGUFReader) -> str:
    arch = value(reader, "general.architecture")
    if arch is None:
        raise PdlaunchError("the GGUF file names no architecture (general.architecture)", field="model.path",
                            hint="pass an intact .gguf file written by llama.cpp's converter (re-download it), or an "
                                 "HF checkpoint directory")
    if arch not in SUPPORTED_ARCHS:
        raise PdlaunchError(f"GGUF architecture {arch!r} is not supported", field="model.path",
                            hint=f"pdlaunch reads GGUF files of these architectures: {', '.join(SUPPORTED_ARCHS)}")
    return str(arch)


_DAMAGED_HINT = ("the file is damaged or was written by an unknown converter: re-download or re-convert it "
                 "(llama.cpp's convert_hf_to_gguf.py)")


def _size(reader: GGUFReader, key: str, default: int | None = None) -> int:
    """The metadata integer `key`, at least 1 (`default` when absent; absent without one: a PdlaunchError). A 0 was a
    ZeroDivisionError (head_count) or a model of empty shapes, a per-layer list a TypeError, each a traceback."""
    found = value(reader, key)
    if found is None:
        if default is not None:
            return default
        raise PdlaunchError(f"GGUF metadata lacks {key}", field="model.path",
                            hint="the file is incomplete or was written by an unknown converter")
    if isinstance(found, bool) or not isinstance(found, int | np.integer) or found < 1:
        per_layer = " (one value per layer, which pdlaunch does not load)" if isinstance(found, list) else ""
        raise PdlaunchError(f"GGUF metadata {key} is {found!r}{per_layer}, not a positive integer",
                            field="model.path", hint=_DAMAGED_HINT)
    return int(found)


def _positive(reader: GGUFReader, key: str, default: float | None = None) -> float:
    """The metadata number `key`, finite and above 0 (`default` when absent; absent without one: a PdlaunchError):
    a 0 or negative rms epsilon or rope base passed the file's checks, then the converted checkpoint was refused
    naming a config.json the user never wrote."""
    found = value(reader, key)
    if found is None and default is not None:
        return default
    if found is None:
        raise PdlaunchError(f"GGUF metadata lacks {key}", field="model.path",
                            hint="the file is incomplete or was written by an unknown converter")
    if isinstance(found, bool) or not isinstance(found, int | float | np.number) or not 0 < found < float("inf"):
        raise PdlaunchError(f"GGUF metadata {key} is {found!r}, not a positive number", field="model.path",
                            hint=_DAMAGED_HINT)
    return float(found)


def _rope_parameters(reader: GGUFReader, arch: str, head_dim: int) -> RopeParameters:
    """transformers 5 `rope_parameters`: plain, linear (metadata) or llama3 (the rope_freqs tensor)."""
    theta = _positive(reader, f"{arch}.rope.freq_base", 10000.0)
    kind = value(reader, f"{arch}.rope.scaling.type", "none")
    factor = value(reader, f"{arch}.rope.scaling.factor")
    freqs = tensor(reader, ROPE_FREQS)
    if freqs is not None:
        scaling = llama3_rope_parameters(dequantized(freqs), head_dim, theta, factor,
                                         value(reader, f"{arch}.rope.scaling.original_context_length"))
        return {**(scaling or {"rope_type": "default"}), "rope_theta": theta}
    # llama.cpp reads an absent or 0 factor as a scale of 1 (plain rope); any other must be a positive number
    if kind == "linear" and factor is not None and factor != 0:
        return {"rope_type": "linear", "factor": _positive(reader, f"{arch}.rope.scaling.factor"),
                "rope_theta": theta}
    if kind not in ("none", "linear"):
        raise PdlaunchError(f"GGUF rope scaling {kind!r} ({arch}.rope.scaling.type) is not supported",
                            field="model.path", hint="pdlaunch reads plain, linear and llama3 (rope_freqs) rope "
                            "from GGUF files; use the model's HF checkpoint directory")
    return {"rope_type": "default", "rope_theta": theta}


def hf_config(reader: GGUFReader) -> HFConfig:
    """config.json (transformers 5 layout) from the GGUF metadata. Raises PdlaunchError naming what is missing."""
    arch = architecture(reader)
    heads, hidden = _size(reader, f"{arch}.attention.head_count"), _size(reader, f"{arch}.embedding_length")
    context = value(reader, f"{arch}.context_length")
    if isinstance(context, int) and context < 1:  # config.json's max_position_embeddings: named as such at load
        raise PdlaunchError(f"GGUF metadata {arch}.context_length is {context}; a model's context is at least 1 "
                            "token", field="model.path", hint=_DAMAGED_HINT)
    context = _size(reader, f"{arch}.context_length")
    head_dim = _size(reader, f"{arch}.attention.key_length", hidden // heads or None)
    kv_heads = _size(reader, f"{arch}.attention.head_count_kv", heads)
    if heads % kv_heads:  # the converted config.json would be refused, naming a file the user never wrote
        raise PdlaunchError(f"GGUF metadata {arch}.attention.head_count {heads} is not a multiple of "
                            f"{arch}.attention.head_count_kv {kv_heads}", field="model.path", hint=_DAMAGED_HINT)
    tensor_names = {t.name for t in reader.tensors}
    embedding = tensor(reader, "token_embd.weight")
    # The embedding's rows are the model's vocabulary (a tokenizer may list fewer tokens, or none).
    vocab = (hf_shape(embedding)[0] if embedding is not None and len(embedding.shape) == 2 else
             len(value(reader, "tokenizer.ggml.tokens", []) or []) or _size(reader, f"{arch}.vocab_size"))
    hf_arch, model_type = _HF_ARCH[arch]
    config: HFConfig = {
        "architectures": [hf_arch], "model_type": model_type,
        "hidden_size": hidden, "num_hidden_layers": _size(reader, f"{arch}.block_count"),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "intermediate_size": _size(reader, f"{arch}.feed_forward_length"), "vocab_size": vocab,
        "max_position_embeddings": context,
        "rope_parameters": _rope_parameters(reader, arch, head_dim),
        "rms_norm_eps": _positive(reader, f"{arch}.attention.layer_norm_rms_epsilon"), "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names, "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": value(reader, "tokenizer.ggml.eos_token_id"), "dtype": "float32",
    }
    window = value(reader, f"{arch}.attention.sliding_window")
    if window:
        config["sliding_window"] = int(window)
    return config
