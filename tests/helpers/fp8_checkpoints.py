"""Tiny random Qwen3 checkpoints in FP8 formats, and float32 copies with the dequantized weights.

The quantization here is written independently of pdlaunch.model.quant (plain torch), so the
float32 copy is a reference for what pdlaunch must compute: transformers on it gives the greedy
ids an FP8 checkpoint must reproduce. Sizes are multiples of the 128 FP8 block (hidden 256, head_dim
128, 2 KV heads, intermediate 256), so TP 2 splits every weight on a block edge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from tests.helpers.checkpoints import _build, _save

Scheme = Literal["block", "channel", "tensor", "online"]
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_E4M3 = torch.float8_e4m3fn


def _block_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    o, i = w.shape
    tiles = w.reshape(o // 128, 128, i // 128, 128)
    scale = tiles.abs().amax(dim=(1, 3)) / 448.0
    q = (tiles / scale[:, None, :, None]).clamp(-448, 448).to(_E4M3).reshape(o, i)
    return q, scale


def _block_dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    o, i = q.shape
    return (q.float().reshape(o // 128, 128, i // 128, 128) * scale[:, None, :, None]).reshape(o, i)


def channel_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel, as `--quantization fp8` does: scale [O, 1] = amax / 448."""
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    return (w / scale).clamp(-448, 448).to(_E4M3), scale


def make_qwen3_base(directory: Path, seed: int = 11) -> Path:
    from transformers import Qwen3Config

    from tests.helpers.checkpoints import _TINY

    config = Qwen3Config(**{**_TINY, "hidden_size": 256, "intermediate_size": 256, "num_attention_heads": 2,
                            "initializer_range": 0.05},
                         num_hidden_layers=2, num_key_value_heads=2, head_dim=128, rope_theta=1000000.0)
    return _save(_build(config, seed), directory, seed)


def make_qwen3_moe_base(directory: Path, seed: int = 12) -> Path:
    """Qwen3-MoE, 2 layers (layer 1 dense), 4 experts of width 128, top-2, block-aligned sizes."""
    from transformers import Qwen3MoeConfig

    from tests.helpers.checkpoints import _MOE, _TINY

    config = Qwen3MoeConfig(**{**_TINY, "hidden_size": 256, "intermediate_size": 256, "num_attention_heads": 2,
                               "initializer_range": 0.05}, **_MOE,
                            num_hidden_layers=2, head_dim=128, num_experts=4,
                            moe_intermediate_size=128, mlp_only_layers=[1], rope_theta=1000000.0)
    return _save(_build(config, seed), directory, seed)


def _quant_config(scheme: Scheme) -> dict[str, object]:
    if scheme == "block":
        return {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic",
                "modules_to_not_convert": ["lm_head"]}
    strategy = "channel" if scheme == "channel" else "tensor"
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"],
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                      "dynamic": True}}}}


def make_fp8_qwen3(directory: Path, scheme: Scheme, seed: int = 11,
                   kv_scales: tuple[float, float] | None = None, moe: bool = False) -> tuple[Path, Path]:
    """(checkpoint to serve, float32 reference checkpoint with the weights pdlaunch must compute with).

    `online`: the served checkpoint is the plain float32 one (served with --quantization fp8).
    `kv_scales`: also write self_attn.k_scale / v_scale (FP8 KV cache scales) into the served checkpoint.
    `moe`: a Qwen3-MoE whose experts are quantized like every other projection (the router is not)."""
    directory = Path(directory)
    kind = "qwen3-moe" if moe else "qwen3"
    served, reference = directory / f"{kind}-{scheme}", directory / f"{kind}-{scheme}-ref"
    for d in (served, reference):
        (make_qwen3_moe_base if moe else make_qwen3_base)(d, seed)
    tensors = load_file(served / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module.rsplit(".", 1)[-1] in _LINEARS):
            out[name] = ref[name] = w
            continue
        if scheme == "block":
            q, s = _block_quant(w.float())
            out[name], out[f"{module}.weight_scale_inv"], ref[name] = q, s, _block_dequant(q, s)
        elif scheme == "tensor":
            s = w.float().abs().amax() / 448.0
            q = (w.float() / s).clamp(-448, 448).to(_E4M3)
            out[name], out[f"{module}.weight_scale"], ref[name] = q, s.reshape(1), q.float() * s
        else:
            q, s = channel_quant(w.float())
            out[name], ref[name] = (w, q.float() * s) if scheme == "online" else (q, q.float() * s)
            if scheme == "channel":
                out[f"{module}.weight_scale"] = s
    if kv_scales is not None:
        for layer in range(2):  # both builders have 2 layers
            out[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(kv_scales[0])
            out[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(kv_scales[1])
    save_file(out, served / "model.safetensors", metadata={"format": "pt"})
    save_file(ref, reference / "model.safetensors", metadata={"format": "pt"})
    if scheme != "online":
        cfg = json.loads((served / "config.json").read_text())
        cfg["quantization_config"] = _quant_config(scheme)
        (served / "config.json").write_text(json.dumps(cfg, indent=2))
    return served, reference


def keep_in_model_dtype(served: Path, reference: Path, modules: tuple[str, ...]) -> None:
    """Turn the block-FP8 checkpoint `served` into one whose projections named `modules` (e.g. "q_proj",
    "down_proj") stay in the model dtype: their reference weights replace the fp8 ones and their scales, and
    quantization_config's modules_to_not_convert lists them beside lm_head (as a checkpoint that keeps the
    attention in bf16 says so)."""
    tensors = load_file(served / "model.safetensors")
    ref = load_file(reference / "model.safetensors")
    kept = [name for name in tensors if name.rsplit(".", 2)[-2] in modules]
    for name in kept:
        del tensors[name]
    tensors.update({name: w for name, w in ref.items()
                    if name.endswith(".weight") and name.rsplit(".", 2)[-2] in modules})
    save_file(tensors, served / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((served / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = ["lm_head", *modules]
    (served / "config.json").write_text(json.dumps(cfg, indent=2))


def make_block_fp8_qwen2_moe(directory: Path, shared: int, seed: int = 13) -> Path:
    """Qwen2-MoE in 128x128-block FP8: 2 layers of 4 experts (width 128, top-2) and a shared expert of width
    `shared` (a multiple of 128), hidden 256, 2 heads of 128; every projection quantized, the routers and the
    shared-expert gate not (as in a block-FP8 checkpoint of Qwen1.5-MoE)."""
    from transformers import Qwen2MoeConfig

    from tests.helpers.checkpoints import _MOE, _TINY

    config = Qwen2MoeConfig(**{**_TINY, "hidden_size": 256, "intermediate_size": 256, "num_attention_heads": 2,
                               "initializer_range": 0.05}, **_MOE,
                            num_hidden_layers=2, num_experts=4, moe_intermediate_size=128,
                            shared_expert_intermediate_size=shared)
    directory = _save(_build(config, seed), Path(directory), seed)
    tensors = load_file(directory / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in _LINEARS:
            out[name], out[f"{module}.weight_scale_inv"] = _block_quant(w.float())
        else:
            out[name] = w
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = _quant_config("block")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return directory


def weight_only_copy(served: Path, directory: Path) -> Path:
    """A copy of the compressed-tensors checkpoint `served` under `directory` whose config group quantizes only the
    weights (no input_activations: an FP8 weight-only checkpoint)."""
    path = Path(shutil.copytree(served, Path(directory) / f"{Path(served).name}-weight-only"))
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]
    (path / "config.json").write_text(json.dumps(cfg))
    return path
