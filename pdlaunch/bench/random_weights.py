"""The random weights of a `pdlaunch bench make-checkpoint` checkpoint: std 0.02 (the config's initializer_range),
norms 1, seeded per tensor name. With `fp8` the linear layers' weights (experts' too) are quantized where they are
drawn and saved as FP8: `block` as a 128x128-block `quant_method: fp8` checkpoint (weight_scale_inv), `channel` as a
compressed-tensors FP8-Dynamic one (weight_scale per output channel).
"""

from __future__ import annotations

import math
import zlib

import torch
from pydantic import JsonValue

from pdlaunch.model.quant import fp8 as fp8_math

FP8_FORMATS = ("block", "channel")
SEED_LIMIT = 2**43  # |seed| below it: random_tensors' seed * 1_000_003 + crc32 fits torch's 64-bit seed
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def fp8_quant_config(fp8: str) -> dict[str, JsonValue]:
    """config.json's quantization_config for `bench make-checkpoint --fp8 block|channel`."""
    if fp8 == "block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
    numbers: dict[str, JsonValue] = {"num_bits": 8, "type": "float", "symmetric": True}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"],
                                          "weights": {**numbers, "strategy": "channel", "dynamic": False},
                                          "input_activations": {**numbers, "strategy": "token", "dynamic": True}}}}


def random_tensors(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float,
                   device: str, fp8: str | None = None) -> dict[str, torch.Tensor]:
    """`name` -> values drawn on `device` (a GPU draws 8B values in seconds, a CPU core in minutes), returned
    on the CPU; with `fp8`, a linear weight comes back as e4m3 with its scale tensor."""
    if name.endswith("norm.weight"):
        return {name: torch.ones(shape, dtype=dtype)}
    # Seeded per tensor name: a tensor's values depend on seed and device, not on the shard plan.
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    values = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
    module = name.removesuffix(".weight")
    if fp8 is None or module.rsplit(".", 1)[-1] not in _LINEARS:
        return {name: values.cpu()}
    if fp8 == "block":
        q, scale = fp8_math.quantize_block(values)
        return {name: q.cpu(), f"{module}.weight_scale_inv": scale.cpu()}
    q, scale = fp8_math.quantize_per_channel(values)
    return {name: q.cpu(), f"{module}.weight_scale": scale.unsqueeze(1).cpu()}


def weight_bytes(shapes: list[tuple[str, tuple[int, ...]]], itemsize: int, fp8: str | None) -> int:
    """FP8 linear weights count one byte each and their scales none: a lower bound of the bytes written."""
    return sum(math.prod(shape) * (1 if fp8 is not None and name.removesuffix(".weight").rsplit(".", 1)[-1]
                                   in _LINEARS else itemsize) for name, shape in shapes)
