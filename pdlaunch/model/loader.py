"""Load a local HF checkpoint: `load_checkpoint` (config + tokenizer) and `load_model` (weights).

The model is built on the meta device (no memory), its parameters are then allocated once on
the target device, and each checkpoint tensor is copied in place through the parameter's own
`weight_loader` (which takes this rank's tensor-parallel shard). Every parameter must be filled
and every checkpoint tensor must be used, otherwise the error names the tensor.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors import SafetensorError, safe_open
from torch import nn

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import ModelArch, load_arch
from pdlaunch.model.demo import BUILT_IN_MODELS, resolve_model_path
from pdlaunch.model.layers import ShardId, default_weight_loader
from pdlaunch.model.llama import CausalLM
from pdlaunch.model.moe.experts import FusedExperts
from pdlaunch.model.moe.names import expert_checkpoint_names, expert_target
from pdlaunch.model.quant.config import QuantConfig, load_quant_config
from pdlaunch.model.quant.experts import ExpertDequantizer
from pdlaunch.model.quant.fp8 import FP8_DTYPE, scale_problem
from pdlaunch.model.quant.linear import finish_loading, fp8_gemm_available, quantize_model
from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.model.weight_files import safetensors_files, unreadable

PROGRESS_BAR_MIN_BYTES = 1 << 30
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_WEIGHT_SCALES = ("weight_scale_inv", "weight_scale", "input_scale")
_KV_SCALES = ("self_attn.k_scale", "self_attn.v_scale")
SCALE_SUFFIXES = _WEIGHT_SCALES + _KV_SCALES  # FP8 scales: small, their values checked (check-config reads them too)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """What a checkpoint directory says, without its weights."""

    arch: ModelArch
    tokenizer: Tokenizer
    path: Path
    name: str  # served model name: "demo", "tiny" or the directory name
    quant: QuantConfig | None = None  # FP8 weights (config.json or --quantization fp8); None: unquantized


def load_checkpoint(path_or_demo: str, quantization: str | None = None) -> Checkpoint:
    """Parse config.json and the tokenizer of a checkpoint directory (or `demo`); `quantization`
    is --quantization (None or "fp8")."""
    path = resolve_model_path(path_or_demo)
    arch = load_arch(path)
    quant = load_quant_config(path, quantization)
    tokenizer = open_tokenizer(path)
    name = path_or_demo if path_or_demo in BUILT_IN_MODELS else path.resolve().name
    return Checkpoint(arch=arch, tokenizer=tokenizer, path=path, name=name, quant=quant)


def weight_dtype_name(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> str:
    """What the weights are stored and computed in, for /info and metrics: e.g. "fp8 block 128x128
    (checkpoint)", or "... computed in float32" where they were dequantized at load (no FP8 GEMMs)."""
    name = str(dtype).removeprefix("torch.")
    if ckpt.quant is None:
        return name
    return ckpt.quant.description if fp8_gemm_available(device) else f"{ckpt.quant.description}, computed in {name}"


def open_tokenizer(path: Path) -> Tokenizer:
    """The checkpoint's tokenizer, its chat template compiled; a broken file is a PdlaunchError naming it."""
    try:
        tokenizer = Tokenizer(path)
    except PdlaunchError:
        raise
    except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
        raise PdlaunchError(f"{path / 'tokenizer.json'} does not load: {exc}", field="model.path",
                            hint="restore the checkpoint's tokenizer.json (a fast-tokenizer file)") from exc
    if tokenizer.chat_template:
        try:
            ImmutableSandboxedEnvironment().parse(tokenizer.chat_template)
        except TemplateSyntaxError as exc:
            raise PdlaunchError(f"the chat template of {path} does not parse: {exc.message} (line {exc.lineno})",
                                field="model.path", hint="fix chat_template in tokenizer_config.json "
                                "(or chat_template.jinja)") from exc
    return tokenizer


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on CUDA, float32 elsewhere; otherwise the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise PdlaunchError(f"unknown dtype {dtype!r}", field="model.dtype", hint=f"use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate every meta parameter on `device`, keeping ties and weight_loader attributes."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:
                new = nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
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
                    module._buffers[bname] = torch.empty_like(buf, device=device)
            init()


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), file
        except SafetensorError as exc:
            raise unreadable(file, exc) from exc


def _target(name: str) -> tuple[str, ShardId]:
    """Checkpoint tensor name -> (our parameter name, shard id for its weight_loader)."""
    moe = expert_target(name)  # one expert's projection -> the layer's stacked experts
    if moe is not None:
        return moe
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in CausalLM.PACKED_MODULES:
            packed, shard = CausalLM.PACKED_MODULES[part]
            return ".".join(parts[:i] + [packed] + parts[i + 1:]), shard
    return name, None


def _expected_names(params: dict[str, nn.Parameter], arch: ModelArch | None = None) -> set[str]:
    """Checkpoint tensor names the model needs (packed parameters expand to their parts, stacked
    experts to every expert's projections)."""
    unpack: dict[str, list[str]] = {}
    for ckpt_name, (packed, _) in CausalLM.PACKED_MODULES.items():
        unpack.setdefault(packed, []).append(ckpt_name)
    names: set[str] = set()
    for pname, param in params.items():
        if hasattr(param, "default_value") or getattr(param, "derived", False):
            continue  # optional (a checkpoint may provide it), or computed at load from other tensors
        experts = expert_checkpoint_names(pname, arch.moe) if arch is not None and arch.moe is not None else None
        if experts is not None:
            names.update(experts)
            continue
        parts = pname.split(".")
        at = next((i for i, p in enumerate(parts) if p in unpack), None)
        if at is None:
            names.add(pname)
        else:
            names.update(".".join(parts[:at] + [u] + parts[at + 1:]) for u in unpack[parts[at]])
    return names


def meta_model(arch: ModelArch, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1,
               expert_parallel: bool = False, quant: QuantConfig | None = None) -> CausalLM:
    """The model on the meta device: every parameter's shape, dtype and weight_loader, no memory.
    `quant`: FP8 linear layers get fp8 weights and float32 scale parameters."""
    with torch.device("meta"):
        model = CausalLM(arch, tp_rank, tp_size, expert_parallel)
    model = model.to(dtype)  # meta: changes dtypes only, allocates nothing (KV scales too: one rounding)
    if quant is not None:
        with torch.device("meta"):
            quantize_model(model, quant, CausalLM.PACKED_MODULES)
    return model


def load_tensor(params: dict[str, nn.Parameter], arch: ModelArch, name: str, tensor: torch.Tensor,
                file: Path, filled: dict[tuple[str, ShardId], tuple[str, str]] | None = None) -> bool:
    """Copy one checkpoint tensor into its parameter through the parameter's weight_loader (which
    checks the unsharded shape). False when the tensor is deliberately not used. With meta parameters
    and a meta tensor only the name and shape are checked: what `check-config` does from headers.
    `filled` (parameter, shard) -> (tensor, file) of the tensors loaded so far: a second tensor for the same
    part (one expert under two names, Mixtral's and Qwen's, or one name in two shards) is an error, not a
    silent overwrite."""
    if name.endswith(_IGNORED_SUFFIXES):
        return False
    if name == "lm_head.weight" and arch.tie_word_embeddings:
        return False  # tied: the embedding table is the output projection
    pname, shard = _target(name)
    param = params.get(pname)
    if param is None:
        scale = name.endswith(_WEIGHT_SCALES)
        raise PdlaunchError(f"unexpected tensor {name!r} in {file.name}", field="model.path",
                            hint="an FP8 scale: config.json lacks (or does not match) the quantization_config it "
                                 "belongs to" if scale else
                                 f"the checkpoint does not match its config.json ({arch.architecture})")
    if not tensor.is_floating_point():
        raise PdlaunchError(f"tensor {name!r} in {file.name} is {str(tensor.dtype).removeprefix('torch.')}, "
                            "not a float dtype", field="model.path",
                            hint="pdlaunch loads float32/bfloat16/float16 weights and FP8 (e4m3) checkpoints")
    if name.endswith(SCALE_SUFFIXES):
        _check_scale(name, tensor, file)
    if tensor.element_size() == 1 and tensor.dtype != FP8_DTYPE:
        raise PdlaunchError(f"tensor {name!r} in {file.name} is {str(tensor.dtype).removeprefix('torch.')}",
                            field="model.path", hint="pdlaunch loads FP8 weights in e4m3 (float8_e4m3fn) only")
    # fp8 experts that quantize float tensors as they load (FusedExperts.prepare_fp8_blocks) take no fp8 one: its
    # values would be taken for real ones without their scale
    wants_fp8 = param.dtype == FP8_DTYPE and not getattr(param, "quantized_on_load", False)
    if (tensor.dtype == FP8_DTYPE) != wants_fp8:
        if wants_fp8:
            quantized = "quantizes this module"
        elif any(p.dtype == FP8_DTYPE for p in params.values()):
            quantized = "does not quantize this module (modules_to_not_convert / ignore lists it, or it is an MoE " \
                        "router)"
        else:
            quantized = "has no FP8 quantization_config"
        raise PdlaunchError(f"tensor {name!r} in {file.name} is {str(tensor.dtype).removeprefix('torch.')} but "
                            f"config.json {quantized}", field="model.path",
                            hint="the checkpoint does not match its config.json's quantization_config")
    if filled is not None:
        first = filled.setdefault((pname, shard), (name, file.name))
        if first != (name, file.name):
            what = f"tensor {name!r} is in both {first[1]} and {file.name}" if first[0] == name else \
                f"tensors {first[0]!r} ({first[1]}) and {name!r} ({file.name}) load into the same weight"
            raise PdlaunchError(what, field="model.path",
                                hint=f"keep one of them: the checkpoint does not match its config.json "
                                     f"({arch.architecture})")
    loader = getattr(param, "weight_loader", default_weight_loader)
    try:
        loader(param, tensor, shard)
    except ValueError as exc:
        raise PdlaunchError(f"tensor {name!r} in {file.name}: {exc}", field="model.path",
                            hint="the checkpoint does not match its config.json") from exc
    return True


def _check_scale(name: str, scale: torch.Tensor, file: Path) -> None:
    """An FP8 weight or KV scale: a float wider than 8 bits, every value finite and not negative (a KV scale,
    a divisor, also not zero)."""
    if scale.element_size() == 1:
        raise PdlaunchError(f"tensor {name!r} in {file.name} is {str(scale.dtype).removeprefix('torch.')}",
                            field="model.path", hint="a scale is float32, bfloat16 or float16")
    problem = scale_problem(scale, positive=name.endswith(_KV_SCALES))
    if problem is not None:
        raise PdlaunchError(f"tensor {name!r} in {file.name} {problem}", field="model.path",
                            hint="the checkpoint's scales are corrupt: re-download or re-quantize it")


def missing_tensors(params: dict[str, nn.Parameter], seen: set[str],
                    arch: ModelArch | None = None) -> PdlaunchError | None:
    """The error naming the tensors the model needs that were not loaded, or None (`arch` names the
    experts of an MoE model)."""
    missing = sorted(_expected_names(params, arch) - seen)
    if not missing:
        return None
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return PdlaunchError(f"checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}", field="model.path",
                         hint="the checkpoint is incomplete or does not match its config.json")


def expert_dequantizer(arch: ModelArch, quant: QuantConfig | None) -> ExpertDequantizer | None:
    """FP8 MoE experts are dequantized as they load (model/quant/experts.py); None when there are none."""
    return ExpertDequantizer(quant) if quant is not None and arch.moe is not None else None


def load_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
               tp_rank: int = 0, tp_size: int = 1, expert_parallel: bool = False,
               fp8_experts_on_load: bool | None = None) -> CausalLM:
    """Build the model on the meta device and load the checkpoint's weights in place
    (`expert_parallel`: whole MoE experts per TP rank, model/moe/experts.py). The MoE experts of an FP8
    checkpoint (or --quantization fp8) are held as 128x128-block fp8 where the device has FP8 support
    (`fp8_experts_on_load` forces it either way: tests), else in `dtype`."""
    device = torch.device(device)
    files = safetensors_files(ckpt.path)
    model = meta_model(ckpt.arch, dtype, tp_rank, tp_size, expert_parallel, ckpt.quant)
    if ckpt.quant is not None and (fp8_gemm_available(device) if fp8_experts_on_load is None else fp8_experts_on_load):
        fp8_experts(model, prepare=True)
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
                    if load_tensor(params, ckpt.arch, name, tensor, file, filled):
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
    model.finish_kv_scales()
    return model


def fp8_experts(model: nn.Module, prepare: bool = False) -> int:
    """Make every MoE layer's experts 128x128-block fp8: `prepare` on the meta model, before loading
    (FusedExperts.prepare_fp8_blocks: the loaders quantize each expert as it arrives), else experts
    already loaded (FusedExperts.to_fp8_blocks, one layer at a time). The number of layers made fp8 (a
    layer whose widths are not multiples of 128 stays in the model dtype, and the log says so once)."""
    converted, kept = 0, None
    for module in model.modules():
        if isinstance(module, FusedExperts):
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
