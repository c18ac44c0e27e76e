"""Load a checkpoint's weights: `load_model` (the checkpoint itself, config + tokenizer, is model/checkpoint.py's).

The model is built on the meta device (no memory), its parameters are then allocated once on
the target device, and each checkpoint tensor is copied in place through the parameter's own
`weight_loader` (which takes this rank's tensor-parallel shard; model/checkpoint_tensors.py). Every parameter
must be filled and every checkpoint tensor must be used, otherwise the error names the tensor.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import ModelArch
from pdlaunch.model.checkpoint import Checkpoint
from pdlaunch.model.checkpoint_tensors import block_scales_without_block_size, load_tensor, missing_tensors
from pdlaunch.model.llama import CausalLM
from pdlaunch.model.moe.experts import FusedExperts
from pdlaunch.model.quant.block_tp import block_tp_rule
from pdlaunch.model.quant.config import QuantConfig
from pdlaunch.model.quant.experts import ExpertDequantizer, keeps_experts
from pdlaunch.model.quant.linear import finish_loading, fp8_gemm_available, quantize_model
from pdlaunch.model.tp_split import check_split
from pdlaunch.model.weight_files import REFETCH_HINT, read_header, safetensors_files, unreadable
from pdlaunch.model.weight_loader import ShardId

PROGRESS_BAR_MIN_BYTES = 1 << 30

log = logging.getLogger(__name__)


def _empty_on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Uninitialized memory on `device` of `tensor`'s shape, strides and dtype. Not torch.empty_like: for a meta
    tensor it runs torch's Python reference, which imports sympy (~1.5 s of a CPU instance's start) and costs a few
    ms a call."""
    return torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device=device)


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate every meta parameter on `device`, keeping ties and weight_loader attributes."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:
                new = nn.Parameter(_empty_on(param, device), requires_grad=False)
                for attr in ("weight_loader", "default_value", "quantized_on_load", "derived"):
                    if hasattr(param, attr):
                        setattr(new, attr, getattr(param, attr))
                if hasattr(param, "default_value"):
                    new.data.fill_(param.default_value)
                replaced[id(param)] = new
            setattr(module, name, replaced[id(param)])
    for module in model.modules():
        init = getattr(module, "init_buffers", None)
        if init is not None:
            for bname, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[bname] = _empty_on(buf, device)
            init()


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), file
        except SafetensorError as exc:
            raise unreadable(file, exc) from exc
        except OSError as exc:  # safetensors' open: permission denied, an I/O error
            raise PdlaunchError(f"{file} cannot be read ({exc.strerror or exc})", field="model.path",
                                hint=REFETCH_HINT) from exc


def meta_model(arch: ModelArch, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1,
               expert_parallel: bool = False, quant: QuantConfig | None = None) -> CausalLM:
    """The model on the meta device: every parameter's shape, dtype and weight_loader, no memory.
    `quant`: FP8 linear layers get fp8 weights and float32 scale parameters. A TP size the model does not split over,
    or that cuts block-FP8 projections off their scale blocks, is refused first, every problem in check-config's
    words in one error (model/tp_split.py), before any layer is built."""
    check_split(arch, tp_size, expert_parallel, block_tp_rule(arch, quant))
    with torch.device("meta"):
        model = CausalLM(arch, tp_rank, tp_size, expert_parallel)
    model = model.to(dtype)  # meta: changes dtypes only, allocates nothing (KV scales too: one rounding)
    if quant is not None:
        with torch.device("meta"):
            quantize_model(model, quant, CausalLM.PACKED_MODULES)
    return model


def expert_dequantizer(arch: ModelArch, quant: QuantConfig | None) -> ExpertDequantizer | None:
    """FP8 MoE experts, and an fp8 lm_head or MoE router, are dequantized as they load (model/quant/experts.py);
    None when there are none (no FP8 checkpoint, or a dense model with tied embeddings: a stored lm_head and its
    scales are not used, checkpoint_tensors.load_tensor)."""
    if quant is None or (arch.moe is None and arch.tie_word_embeddings):
        return None
    return ExpertDequantizer(quant)


def load_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
               tp_rank: int = 0, tp_size: int = 1, expert_parallel: bool = False,
               fp8_experts_on_load: bool | None = None, fp8_kv_cache: bool = False) -> CausalLM:
    """Build the model on the meta device and load the checkpoint's weights in place
    (`expert_parallel`: whole MoE experts per TP rank, model/moe/experts.py). The MoE experts of an FP8
    checkpoint (or --quantization fp8) are held as 128x128-block fp8 where the device has FP8 support
    (`fp8_experts_on_load` forces it either way: tests), else in `dtype`, as are experts the checkpoint's ignore
    list keeps unquantized. `fp8_kv_cache`: the KV cache is fp8 and applies the k/v scales (per-head ones are
    refused; without it they are left unused: checkpoint_tensors.load_tensor)."""
    device = torch.device(device)
    files = safetensors_files(ckpt.path)
    no_block_size = block_scales_without_block_size(ckpt.quant, ((h.name, f) for f in files for h in read_header(f)))
    if no_block_size is not None:
        raise no_block_size
    model = meta_model(ckpt.arch, dtype, tp_rank, tp_size, expert_parallel, ckpt.quant)
    quant, moe = ckpt.quant, ckpt.arch.moe
    if quant is not None and moe is not None and (
            fp8_gemm_available(device) if fp8_experts_on_load is None else fp8_experts_on_load):
        fp8_experts(model, prepare=True, keep=lambda layer: keeps_experts(layer, moe, quant))
    _materialize(model, device)
    model.eval()

    params = dict(model.named_parameters())
    seen: set[str] = set()
    filled: dict[tuple[str, ShardId], tuple[str, str]] = {}
    total_bytes = sum(f.stat().st_size for f in files)
    show_bar = total_bytes > PROGRESS_BAR_MIN_BYTES and sys.stdout.isatty()
    progress = None
    if show_bar:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("loading {task.description}"), BarColumn(), DownloadColumn(),
                            TimeRemainingColumn())
        task = progress.add_task(ckpt.name, total=total_bytes)
        progress.start()
    experts = expert_dequantizer(ckpt.arch, ckpt.quant)
    try:
        with torch.no_grad():
            for raw_name, raw, file in _iter_tensors(files):
                for name, tensor in experts.feed(raw_name, raw) if experts is not None else [(raw_name, raw)]:
                    if load_tensor(params, ckpt.arch, name, tensor, file, filled, fp8_kv_cache, ckpt.quant):
                        seen.add(name)
                if progress is not None:
                    progress.advance(task, raw.numel() * raw.element_size())
    finally:
        if progress is not None:
            progress.stop()
    unpaired = experts.check_complete() if experts is not None else None
    if unpaired is not None:
        raise unpaired
    missing = missing_tensors(params, seen, ckpt.arch)
    if missing is not None:
        raise missing
    with torch.no_grad():
        finish_loading(model, dtype)
    model.finish_kv_scales({pname for pname, _ in filled})
    return model


def fp8_experts(model: nn.Module, prepare: bool = False, keep: Callable[[str], bool] | None = None) -> int:
    """Make every MoE layer's experts 128x128-block fp8: `prepare` on the meta model, before loading
    (FusedExperts.prepare_fp8_blocks: the loaders quantize each expert as it arrives), else experts
    already loaded (FusedExperts.to_fp8_blocks, one layer at a time). The number of layers made fp8 (a
    layer whose widths are not multiples of 128 stays in the model dtype, and the log says so once; a layer whose
    module name `keep` is true for stays too: experts the checkpoint keeps unquantized)."""
    converted, kept = 0, None
    for name, module in model.named_modules():
        if isinstance(module, FusedExperts) and not (keep is not None and keep(name)):
            if module.prepare_fp8_blocks() if prepare else module.to_fp8_blocks():
                converted += 1
            else:
                kept = module
    if kept is not None:
        log.warning("FP8 MoE experts stay in %s: the expert width per rank (%d) or the hidden size (%d) is not "
                    "a multiple of 128, so 128x128 blocks do not tile them (a TP size that keeps the width per "
                    "rank a multiple of 128, or --enable-expert-parallel, would)", kept.w13.dtype,
                    kept.inter_local, kept.hidden)
    return converted
