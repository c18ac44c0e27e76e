"""FP8 linear layers: which layers are quantized, their scale parameters and how those are sharded,
and the matmul they run.

`quantize_model` runs on the meta model, before any weight is allocated: each tensor-parallel linear
layer that the checkpoint quantizes gets an fp8 `weight` and a float32 scale parameter named after
the checkpoint tensor (`weight_scale_inv` or `weight_scale`), each with a weight_loader that takes
this rank's shard. Block scales follow the weight's row (column-parallel) or column (row-parallel)
shard block by block, so every shard boundary, and every projection's start in a fused q/k/v or gate/up
weight, must fall on a 128 block edge (`quantize_model` refuses a layer where one does not). Per-tensor scales are
stored per row (one checkpoint scalar per q/k/v or gate/up shard broadcast over its rows).

`finish_loading` runs once every tensor is in: on CPU, or a GPU without FP8 GEMMs (compute
capability < 8.9), weights are dequantized into the model dtype and the layer is an ordinary one
again (the exact reference the CPU tests compare against). On FP8 GPUs the weight stays fp8 and
`Fp8LinearMethod.apply` quantizes activations per token (per 128-column group for block weights)
and runs `torch._scaled_mm` (per channel; block scales too on sm_90 from 65 rows, 17 for gate_up-sized
weights) or the Triton block-scaled GEMMs (model/quant/gemm.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.parallel_linear import ColumnParallelLinear, RowParallelLinear
from pdlaunch.model.quant import fp8
from pdlaunch.model.quant.config import BLOCK, QuantConfig
from pdlaunch.model.quant.fp8 import Fp8Rows
from pdlaunch.model.weight_loader import ShardId

Linear = ColumnParallelLinear | RowParallelLinear


def fp8_gemm_available(device: torch.device) -> bool:
    """FP8 tensor-core GEMMs: CUDA compute capability >= 8.9 (Ada, Hopper and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8LinearMethod:
    """y = x W^T (+ bias) for an FP8 weight on a GPU with FP8 GEMMs (see the module docstring)."""

    def __init__(self, quant: QuantConfig) -> None:
        self.quant = quant
        self.block = quant.scheme == "block"

    def apply(self, layer: nn.Module, x: torch.Tensor | Fp8Rows, bias: torch.Tensor | None) -> torch.Tensor:
        from pdlaunch.model.quant.gemm import block_fp8_linear, channel_fp8_linear  # layering: lazy (triton)

        weight, scale = _tensor(layer, "weight"), _tensor(layer, "weight_scale_fp8")
        if isinstance(x, Fp8Rows):  # quantized by the kernel before, as input_layout said
            y = block_fp8_linear(x, weight, scale, x.dtype)
            return y + bias if bias is not None else y
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        gemm = block_fp8_linear if self.block else channel_fp8_linear
        y = gemm(x2, weight, scale, x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])

    def input_layout(self, layer: nn.Module, rows: int) -> bool | None:
        """Block weights: quant/gemm.py's fp8_input_layout for x of `rows` rows; per-channel ones: None."""
        if not self.block:
            return None
        from pdlaunch.model.quant.gemm import fp8_input_layout  # layering: lazy (triton)

        return fp8_input_layout(rows, _tensor(layer, "weight"), _tensor(layer, "weight_scale_fp8"))


def _tensor(layer: nn.Module, name: str) -> torch.Tensor:
    value = getattr(layer, name)
    assert isinstance(value, torch.Tensor)
    return value


def _blocks(rows: int) -> int:
    return -(-rows // BLOCK)


def _aligned(offset: int, what: str) -> int:
    if offset % BLOCK:
        raise ValueError(f"{what} starts at row/column {offset}, not on a {BLOCK}-wide FP8 block edge "
                         "(a tensor-parallel shard must cover whole blocks)")
    return offset // BLOCK


def _block_scale_loader(layer: Linear) -> Callable[..., None]:
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if isinstance(layer, ColumnParallelLinear):
            full, src, size, dest = layer.row_shard(shard_id)
            want = (_blocks(full), _blocks(layer.in_features))
            if tuple(loaded.shape) != want:
                raise ValueError(f"block scale shape mismatch: checkpoint {tuple(loaded.shape)}, expected {want} "
                                 f"for a [{full}, {layer.in_features}] weight in {BLOCK}x{BLOCK} blocks")
            first, rows = _aligned(src, "the shard"), _blocks(size)
            at = _aligned(dest, "the shard")
            param.data.narrow(0, at, rows).copy_(loaded.narrow(0, first, rows))
            return
        src, size = layer.col_shard()
        want = (_blocks(layer.weight.shape[0]), _blocks(size * layer.tp_size))
        if tuple(loaded.shape) != want:
            raise ValueError(f"block scale shape mismatch: checkpoint {tuple(loaded.shape)}, expected {want} for a "
                             f"[{layer.weight.shape[0]}, {size * layer.tp_size}] weight in {BLOCK}x{BLOCK} blocks")
        param.data.copy_(loaded.narrow(1, _aligned(src, "the shard"), _blocks(size)))
    return load


def _row_scale_loader(layer: Linear, per_tensor: bool) -> Callable[..., None]:
    """Per-channel ([out, 1] or [out]) or per-tensor ([] or [1]) scales, stored as one float per row."""
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if isinstance(layer, ColumnParallelLinear):
            full, src, size, dest = layer.row_shard(shard_id)
        else:
            full, src, size, dest = layer.weight.shape[0], 0, layer.weight.shape[0], 0
        if per_tensor:
            if loaded.numel() != 1:
                raise ValueError(f"per-tensor scale has shape {tuple(loaded.shape)}, expected one value")
            loaded = loaded.reshape(1).expand(full)
        elif tuple(loaded.shape) not in ((full, 1), (full,)):
            raise ValueError(f"per-channel scale shape mismatch: checkpoint {tuple(loaded.shape)}, "
                             f"expected ({full}, 1)")
        param.data.narrow(0, dest, size).copy_(loaded.reshape(full).narrow(0, src, size))
    return load


def _scale_param(shape: tuple[int, ...], loader: Callable[..., None]) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


def _checkpoint_names(prefix: str, packed: dict[str, tuple[str, ShardId]]) -> list[str]:
    """Our module name -> the checkpoint module names it is loaded from (qkv_proj -> q/k/v_proj)."""
    head, _, leaf = prefix.rpartition(".")
    parts = [name for name, (ours, _) in packed.items() if ours == leaf]
    return [f"{head}.{p}" if head else p for p in parts] or [prefix]


def _check_block_edges(layer: Linear, prefix: str, names: list[str], packed: dict[str, tuple[str, ShardId]]) -> None:
    """Every projection of a block-FP8 layer starts on a 128 edge, in the checkpoint and in this rank's weight: else
    one 128x128 scale block would cover two projections fused into one matmul (q/k/v, gate/up) or two TP shards. The
    scale loaders would refuse each such tensor as "not matching its config.json"; this names the cause once."""
    problem = None
    if isinstance(layer, ColumnParallelLinear):
        fused = "/".join(name.rpartition(".")[2] for name in names)
        for name in names:
            _, src, _, dest = layer.row_shard(packed.get(name.rpartition(".")[2], ("", None))[1])
            if dest % BLOCK:
                problem = f"{name} starts at row {dest} of {prefix} ({fused} in one matmul)"
            elif src % BLOCK:
                problem = f"this rank's shard of {name} starts at its row {src}"
            if problem is not None:
                break
    elif layer.col_shard()[0] % BLOCK:
        problem = f"this rank's shard of {prefix} starts at its column {layer.col_shard()[0]}"
    if problem is None:
        return
    tp = f" at TP {layer.tp_size}" if layer.tp_size > 1 else ""
    # At TP 1 the fused projections' own sizes miss the edge: no TP size helps (check-config's weight check, at TP 1)
    hint = (f"use a TP size whose shards are whole {BLOCK}-row blocks, or (projection sizes that are not multiples "
            f"of {BLOCK}) serve the unquantized checkpoint with --quantization fp8" if tp else
            f"its projection sizes are not multiples of {BLOCK} at any TP size: serve the unquantized checkpoint with "
            "--quantization fp8, or a per-channel FP8 checkpoint")
    raise PdlaunchError(f"block-FP8{tp}: {problem}, not on a {BLOCK} edge, so one {BLOCK}x{BLOCK} scale block would "
                        "cover two projections or two TP shards", field="model.path", hint=hint)


def quantize_model(model: nn.Module, quant: QuantConfig, packed: dict[str, tuple[str, ShardId]]) -> None:
    """Give every quantized linear layer of the meta model its fp8 weight and scale parameters.

    `packed` maps checkpoint module names to ours (CausalLM.PACKED_MODULES)."""
    for prefix, layer in model.named_modules():
        if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            continue
        names = _checkpoint_names(prefix, packed)
        skipped = [quant.skips(n) for n in names]
        if all(skipped):
            continue
        if any(skipped):
            raise PdlaunchError(f"{', '.join(names)} are computed in one matmul but the checkpoint quantizes only "
                                "some of them", field="config.json:quantization_config",
                                hint="quantize all of them or none (modules_to_not_convert / ignore)")
        if quant.scheme == "block":
            _check_block_edges(layer, prefix, names, packed)
        layer.quant_method = Fp8LinearMethod(quant)
        if quant.source == "online":
            continue  # the checkpoint's weights load as they are and are quantized in finish_loading
        weight = layer.weight
        fp8_weight = nn.Parameter(torch.empty(weight.shape, dtype=fp8.FP8_DTYPE, device=weight.device),
                                  requires_grad=False)
        fp8_weight.weight_loader = weight.weight_loader  # type: ignore[attr-defined]
        layer.weight = fp8_weight
        rows, cols = weight.shape
        if quant.scheme == "block":
            scale = _scale_param((_blocks(rows), _blocks(cols)), _block_scale_loader(layer))
        else:
            scale = _scale_param((rows,), _row_scale_loader(layer, per_tensor=quant.scheme == "tensor"))
        layer.register_parameter(quant.scale_name, scale)


def finish_loading(model: nn.Module, dtype: torch.dtype) -> None:
    """After every tensor is loaded: quantize online weights, then either dequantize into `dtype`
    (no FP8 GEMMs on this device) or lay the scales out for the GPU matmul."""
    for layer in model.modules():
        if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            continue
        method = layer.quant_method
        if not isinstance(method, Fp8LinearMethod):
            continue
        quant = method.quant
        if quant.source == "online":
            weight, scale = fp8.quantize_per_channel(_tensor(layer, "weight").data)
        else:
            weight, scale = _tensor(layer, "weight").data, _tensor(layer, quant.scale_name).data
            delattr(layer, quant.scale_name)
        if not fp8_gemm_available(weight.device):
            deq = fp8.dequantize(weight, scale, BLOCK if method.block else None)
            layer.weight = nn.Parameter(deq.to(dtype), requires_grad=False)
            layer.quant_method = None  # an ordinary layer again
            continue
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if method.block:
            from pdlaunch.model.quant.cublas_gemm import cublas_block_scaled  # layering: lazy (triton)

            cublas_block_scaled(weight.device)  # checked here, at load, never inside a CUDA-graph capture
        # Block: [O/128, I/128] float32; per channel: [1, O] float32 (the row-wise scale_b of _scaled_mm).
        layer.weight_scale_fp8 = nn.Parameter(scale.contiguous() if method.block else scale.reshape(1, -1),
                                              requires_grad=False)

