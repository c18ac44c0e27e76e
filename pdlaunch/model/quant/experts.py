"""FP8 MoE experts as they load: each expert's fp8 projection is paired with its scale tensor and
dequantized before it reaches the stacked expert parameters (model/moe/experts.py), so the loaders
shard one layout whatever the checkpoint's scheme. On CPU the experts stay in the model dtype (the exact
reference of the CPU tests); on a GPU with FP8 support the expert loaders quantize each one again into
128x128-block fp8 as it arrives (model/moe/experts.py `prepare_fp8_blocks`), which the fused MoE kernels read,
unless the checkpoint keeps the layer's experts unquantized (`keeps_experts`).

The layers pdlaunch always computes in the model dtype, the output projection `lm_head` and the MoE block's small
replicated layers, the router and Qwen2-MoE's shared-expert gate (model/moe/block.py `Replicated`): most checkpoints
keep them so, but one that quantizes them (llm-compressor quantizes every Linear its `ignore` leaves, and the router
pattern MoE recipes list, `re:.*mlp.gate$`, leaves `shared_expert_gate`) stores them in fp8 with a scale, and they
are dequantized here too.

Checkpoint order is free (a weight may come before or after its scale, in another shard), so tensors
wait here until their partner arrives; `check_complete` names any that never found one.
"""

from __future__ import annotations

import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.moe.config import MoeArch
from pdlaunch.model.moe.names import expert_checkpoint_names
from pdlaunch.model.quant import fp8
from pdlaunch.model.quant.config import BLOCK, QuantConfig

# Checkpoint module names of the MoE blocks' replicated layers (the routers, Qwen2-MoE's shared-expert gate); with
# lm_head, the layers kept in the model dtype (`_model_dtype`).
_REPLICATED = (".mlp.gate", ".block_sparse_moe.gate", ".mlp.shared_expert_gate")


def _model_dtype(module: str) -> bool:
    """A layer computed in the model dtype whatever the checkpoint stores: a float weight of one loads as it is,
    without a scale, whatever the ignore list says; an fp8 one is dequantized with its scale."""
    return module == "lm_head" or module.endswith(_REPLICATED)


def _blocks(size: int) -> int:
    return -(-size // BLOCK)


def keeps_experts(layer: str, moe: MoeArch, quant: QuantConfig) -> bool:
    """True when the checkpoint keeps an expert of FusedExperts `layer` (e.g. model.layers.0.mlp.experts)
    unquantized: its modules_to_not_convert / ignored_layers / ignore names one of the layer's expert projections.
    The layer then stays in the model dtype on an FP8 GPU too, as the checkpoint's own weights are."""
    names = [name for param in ("w13", "w2") for name in expert_checkpoint_names(f"{layer}.{param}", moe) or []]
    return any(quant.skips(name.removesuffix(".weight")) for name in names)


class ExpertDequantizer:
    """feed(name, tensor) -> the (name, tensor) pairs to load now: other tensors pass through, an
    expert's (or lm_head's, a router's, a shared-expert gate's) fp8 weight comes out dequantized (float32) once its
    scale has been fed too."""

    def __init__(self, quant: QuantConfig) -> None:
        self.quant = quant
        self.weights: dict[str, torch.Tensor] = {}  # expert weight name -> fp8 weight awaiting its scale
        self.scales: dict[str, torch.Tensor] = {}  # expert weight name -> scale awaiting its weight
        self.unscaled: set[str] = set()  # model-dtype layers' float weights, loaded as they are

    def _module(self, name: str) -> str | None:
        """The expert (or model-dtype) module a weight or scale belongs to (None: a tensor that passes through)."""
        for suffix in (".weight", "." + self.quant.scale_name):
            if name.endswith(suffix):
                module = name.removesuffix(suffix)
                if ".experts." in name or _model_dtype(module):
                    return None if self.quant.skips(module) else module
        return None

    def weight_name(self, name: str) -> str | None:
        """The expert weight a checkpoint weight or scale `name` pairs into (None: not a quantized expert tensor)."""
        module = self._module(name)
        return None if module is None else f"{module}.weight"

    def pending(self) -> set[str]:
        """Expert weight names fed so far whose partner (weight or scale) has not arrived."""
        return set(self.weights) | set(self.scales)

    def feed(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        module = self._module(name)
        if module is None or self.quant.source == "online":
            return [(name, tensor)]
        weight_name = f"{module}.weight"
        if name == weight_name:
            if _model_dtype(module) and tensor.dtype != fp8.FP8_DTYPE and weight_name not in self.scales:
                self.unscaled.add(weight_name)  # kept in the model dtype by the checkpoint: nothing to pair
                return [(name, tensor)]
            self.weights[weight_name] = tensor
        else:
            if weight_name in self.unscaled:
                raise _scaled_float(weight_name, name)
            self.scales[weight_name] = tensor
        if weight_name not in self.weights or weight_name not in self.scales:
            return []
        weight, scale = self.weights.pop(weight_name), self.scales.pop(weight_name)
        return [(weight_name, self._dequantize(weight_name, weight, scale))]

    def _dequantize(self, weight_name: str, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rows, cols = weight.shape
        scale_name = weight_name.removesuffix("weight") + self.quant.scale_name
        if self.quant.scheme == "block":
            want: tuple[tuple[int, ...], ...] = ((_blocks(rows), _blocks(cols)),)
        elif self.quant.scheme == "channel":
            want = ((rows, 1), (rows,))
        else:
            want = ((), (1,))
        dtype_problem = fp8.weight_dtype_problem(weight)
        if dtype_problem is not None:  # e5m2 or int8: not a float weight with a stray scale
            raise PdlaunchError(f"tensor {weight_name!r} {dtype_problem[0]}", field="model.path", hint=dtype_problem[1])
        if weight.dtype != fp8.FP8_DTYPE:
            raise _scaled_float(weight_name, scale_name, weight.dtype)
        if tuple(scale.shape) not in want:
            raise PdlaunchError(f"tensor {scale_name!r} has shape {tuple(scale.shape)} for a [{rows}, {cols}] expert "
                                f"weight; expected {want[0]}", field="model.path",
                                hint="the checkpoint does not match its config.json's quantization_config")
        # Applied here, the scale never reaches the loader's checks (loader.py _check_scale): they are made here.
        if not scale.is_floating_point() or scale.element_size() == 1:
            raise PdlaunchError(f"tensor {scale_name!r} is {str(scale.dtype).removeprefix('torch.')}",
                                field="model.path", hint="a scale is float32, bfloat16 or float16")
        problem = fp8.scale_problem(scale)
        if problem is not None:
            raise PdlaunchError(f"tensor {scale_name!r} {problem}", field="model.path",
                                hint="the checkpoint's scales are corrupt: re-download or re-quantize it")
        if weight.is_meta:  # check-config: shapes only
            return torch.empty(weight.shape, dtype=torch.float32, device="meta")
        if self.quant.scheme == "block":
            return fp8.dequantize(weight, scale, BLOCK)
        return fp8.dequantize(weight, scale.reshape(-1) if self.quant.scheme == "channel" else scale.reshape(()))

    def check_complete(self) -> PdlaunchError | None:
        """The error naming an expert weight or scale whose partner the checkpoint lacks, or None."""
        if self.weights:
            name = sorted(self.weights)[0]
            lacking = name.removesuffix("weight") + self.quant.scale_name
        elif self.scales:
            lacking = sorted(self.scales)[0]
        else:
            return None
        more = len(self.weights) + len(self.scales) - 1
        return PdlaunchError(f"checkpoint lacks tensor(s) {lacking}" + (f" and {more} more" if more else ""),
                             field="model.path", hint="the checkpoint is incomplete or does not match its config.json")


def _scaled_float(weight_name: str, scale_name: str, dtype: torch.dtype | None = None) -> PdlaunchError:
    """The error for a weight stored in a float dtype beside an FP8 scale (`dtype` None: the one it was loaded in)."""
    what = f"is {str(dtype).removeprefix('torch.')}" if dtype is not None else "is not fp8"
    return PdlaunchError(f"tensor {weight_name!r} {what} but has a scale ({scale_name!r}) and config.json quantizes "
                         "this module", field="model.path",
                         hint="the checkpoint does not match its config.json's quantization_config")
