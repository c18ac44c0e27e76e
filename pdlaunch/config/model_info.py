"""What validation needs from a checkpoint's config.json: architecture, heads, sizes, parameter count.

Only config.json is read (no weights), so a GPU deployment can be checked on a laptop.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pdlaunch.config.problems import Problem, problem
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.config_sizes import config_sizes  # torch-free
from pdlaunch.model.families import HF_DEFAULTS, architecture_of  # torch-free: only pydantic and json
from pdlaunch.model.file_kind import special_file_kind
from pdlaunch.model.moe.config import DENSE_FAMILY, MOE_ARCHITECTURES, MoeArch, config_bool, config_int, parse_moe
from pdlaunch.model.weight_files import gguf_hint  # torch-free: reads headers and file names only

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int | None  # None: config.json's is invalid (reported by the checkpoint rules)
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool = False
    qk_norm: bool = False  # Qwen3: q_norm and k_norm, [head_dim] each, per layer
    qk_norm_full_width: bool = False  # OLMoE: q_norm [heads * head_dim] and k_norm [kv heads * head_dim]
    moe: MoeArch | None = None  # Mixture-of-Experts models

    def _mlp_parameters(self, layer: int, active: bool = False) -> int:
        """The layer's MLP weights: the dense MLP, or the router, the experts and the shared expert (and its
        gate); `active`: only those one token multiplies through (the top-k experts, not all of them)."""
        h = self.hidden_size
        if self.moe is None or not self.moe.is_sparse(layer):
            return 3 * h * self.intermediate_size
        m = self.moe
        shared = 3 * h * m.shared_expert_intermediate_size + h if m.shared_expert_intermediate_size else 0
        experts = m.top_k if active else m.num_experts
        return m.num_experts * h + experts * 3 * h * m.expert_intermediate_size + shared

    def num_parameters(self) -> int:
        """Weights of a Llama-family decoder: embeddings, per-layer attention + gated MLP (or router, experts
        and shared expert) + 2 norms, lm_head."""
        h, d = self.hidden_size, self.head_dim
        q_out, kv_out = self.num_heads * d, self.num_kv_heads * d
        attn = h * q_out + 2 * h * kv_out + q_out * h
        if self.qkv_bias:
            attn += q_out + 2 * kv_out
        if self.o_proj_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * d
        if self.qk_norm_full_width:
            attn += q_out + kv_out
        layers = sum(attn + self._mlp_parameters(i) + 2 * h for i in range(self.num_layers))
        embed = self.vocab_size * h
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + layers + h + lm_head

    def prefill_flops(self, tokens: int) -> int:
        """Multiply-add FLOPs (2 per multiply-add) of prefilling one prompt of `tokens` tokens: every token
        through each layer's projections and its active MLP weights, causal attention (QK^T and PV over the
        tokens before each one: 2 * 2 * heads * head_dim per pair, t^2 / 2 pairs per layer), and the logits of
        the last token only. Norms, rotary and softmax are left out (a fraction of a percent at any size)."""
        h, d = self.hidden_size, self.head_dim
        q_out, kv_out = self.num_heads * d, self.num_kv_heads * d
        projections = h * q_out + 2 * h * kv_out + q_out * h
        linear = sum(projections + self._mlp_parameters(i, active=True) for i in range(self.num_layers))
        attention = 2 * tokens * tokens * q_out * self.num_layers
        return 2 * linear * tokens + attention + 2 * h * self.vocab_size

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int) -> int:
        """K and V of one token, all layers, on one TP rank (KV heads are replicated when tp > kv heads)."""
        kv_heads_per_rank = max(1, self.num_kv_heads // tp)
        return 2 * self.num_layers * kv_heads_per_rank * self.head_dim * dtype_bytes


def _from_hf_dict(hf: dict[str, object], source: str) -> tuple[ModelInfo | None, list[Problem]]:
    """A key config.json omits reads as the loader reads it: transformers' default for its architecture."""
    try:
        arch = architecture_of(hf, source)  # the loader's words, so check and serve say the same
    except PdlaunchError as exc:
        return None, [problem("model.path", exc.message, exc.hint or "")]
    defaults = HF_DEFAULTS[arch]
    try:
        size = config_sizes(hf, defaults, source)  # what the loader reads, refused in its words
    except PdlaunchError as exc:
        return None, [problem("model.path", exc.message, exc.hint or "")]
    try:  # the loader's reading (model/arch.py); absent or null: the family's default
        max_pos: int | None = defaults.max_position_embeddings if hf.get("max_position_embeddings") is None \
            else config_int(hf, "max_position_embeddings")
    except PdlaunchError:
        max_pos = None  # present but invalid: checkpoint_problems reports it with its key, in the loader's words
    family = DENSE_FAMILY.get(arch, arch)  # an MoE family's attention is a dense family's
    moe = None
    try:
        if arch in MOE_ARCHITECTURES:
            moe = parse_moe(hf, arch, size.num_hidden_layers)
        # the loader's reading (model/arch.py): a quoted "false" is refused here too, not read as true
        tied = config_bool(hf, "tie_word_embeddings")
        attention_bias = config_bool(hf, "attention_bias")
        qwen2_qkv_bias = family == "Qwen2ForCausalLM" and config_bool(hf, "qkv_bias", True)
    except PdlaunchError as exc:
        return None, [problem("model.path", f"{source}: {exc.message.removeprefix('config.json ')}",
                              exc.hint or "use the checkpoint's original config.json")]
    info = ModelInfo(
        architecture=arch,
        hidden_size=size.hidden_size,
        num_layers=size.num_hidden_layers,
        num_heads=size.num_attention_heads,
        num_kv_heads=size.num_key_value_heads,
        head_dim=size.head_dim,
        intermediate_size=size.intermediate_size,
        vocab_size=size.vocab_size,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tied,
        qkv_bias=qwen2_qkv_bias or (family != "Qwen2ForCausalLM" and attention_bias),
        o_proj_bias=family != "Qwen2ForCausalLM" and attention_bias,
        qk_norm=family == "Qwen3ForCausalLM",
        qk_norm_full_width=arch == "OlmoeForCausalLM",
        moe=moe,
    )
    return info, []


_LOCAL_MODEL = "give a local HF checkpoint directory (config.json + safetensors), a .gguf file, `demo` or `tiny`"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id_hint(path: str) -> str | None:
    """How to get a local checkpoint when `path` reads like a hub id (`ORG/NAME`), else None."""
    if not _HUB_ID.match(path):
        return None
    directory = path.split("/")[1]
    return (f"{path!r} looks like a Hugging Face hub id, and pdlaunch reads local checkpoints only: run "
            f"`huggingface-cli download {path} --local-dir {directory}`, then pass `{directory}`")


def load_model_info(path: str) -> tuple[ModelInfo | None, list[Problem]]:
    """ModelInfo of `demo`, `tiny`, a .gguf file or a checkpoint directory, or the problems that make it unusable."""
    if path == "tiny":
        from pdlaunch.model.demo import DEMO_HF_CONFIG  # lazy: the model package imports torch

        return _from_hf_dict(dict(DEMO_HF_CONFIG), "the tiny random model")
    if path == "demo":
        from pdlaunch.model.demo_model import DEMO_MODEL_CONFIG

        return _from_hf_dict(dict(DEMO_MODEL_CONFIG), "the demo model")
    if not path.strip():  # `--model "$MODEL"` with MODEL unset: Path("") is the working directory, not a model
        return None, [problem("model.path", f"{path!r} names no model", _LOCAL_MODEL)]
    model_dir = Path(os.path.expanduser(path))  # Path.expanduser raises on `~nosuchuser`
    try:
        is_dir, is_file, exists = model_dir.is_dir(), model_dir.is_file(), model_dir.exists()
        has_config = is_dir and (model_dir / "config.json").is_file()
    except OSError as exc:  # a name too long for the file system, a loop of symlinks, an I/O error
        return None, [problem("model.path", f"{path!r} cannot be read: {exc.strerror or exc}", _LOCAL_MODEL)]
    if path.lower().endswith(".gguf") and is_file:
        return _from_gguf(model_dir)
    if (special := special_file_kind(model_dir)) is not None:  # read as "is a file" (or, by some, as missing)
        return None, [problem("model.path", f"{path!r} is {special}, not a checkpoint directory or .gguf file",
                              f"{_LOCAL_MODEL} (write a pipe's output to a file first)")]
    if not exists:
        return None, [problem("model.path", f"{path!r} does not exist", hub_id_hint(path) or _LOCAL_MODEL)]
    if not is_dir:
        hint = (f"point at the checkpoint directory that holds it, {str(model_dir.parent)!r}"
                if model_dir.name == "config.json" or model_dir.suffix == ".safetensors" else _LOCAL_MODEL)
        return None, [problem("model.path", f"{path!r} is a file, not a directory", hint)]
    config_file = model_dir / "config.json"
    if not has_config:
        return None, [problem("model.path", f"{path!r} has no config.json",
                              gguf_hint(model_dir) or "point at the checkpoint directory that holds config.json")]
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        why = "it nests too deeply" if isinstance(exc, RecursionError) else str(exc).split("; use sys.")[0]
        return None, [problem("model.path", f"{str(config_file)!r} is not valid JSON ({why})",
                              "restore the checkpoint's config.json")]
    if not isinstance(hf, dict):
        return None, [problem("model.path", f"{str(config_file)!r} is not a JSON object",
                              "restore the checkpoint's config.json")]
    return _from_hf_dict(hf, str(config_file))


def _from_gguf(path: Path) -> tuple[ModelInfo | None, list[Problem]]:
    """ModelInfo from a GGUF file's metadata (the header only: no weight is dequantized). Tensors, tokenizer
    and quant types are checked by rules/checkpoint.py, as a directory's weights are."""
    from pdlaunch.model.gguf import metadata as gguf_metadata  # lazy: imports numpy and the gguf package

    try:
        hf = gguf_metadata.hf_config(gguf_metadata.open_reader(path))
    except PdlaunchError as exc:
        return None, [problem("model.path", exc.message, exc.hint or "use an intact .gguf file")]
    return _from_hf_dict(dict(hf), str(path))
