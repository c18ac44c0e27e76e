"""One checkpoint tensor into its parameter (`load_tensor`: the name mapped through `CausalLM.PACKED_MODULES` and
the stacked experts, dtype and FP8 scale checks, the copy through the parameter's `weight_loader`), and the error
naming the tensors a model needs that never came (`missing_tensors`). Both `load_model` and `check-config` (from
headers only, on the meta device) go through them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import ModelArch
from pdlaunch.model.llama import CausalLM
from pdlaunch.model.moe.names import expert_checkpoint_names, expert_target
from pdlaunch.model.quant.config import QuantConfig
from pdlaunch.model.quant.fp8 import FP8_DTYPE, scale_problem, weight_dtype_problem
from pdlaunch.model.weight_loader import ShardId, default_weight_loader

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_WEIGHT_SCALES = ("weight_scale_inv", "weight_scale", "input_scale")
# Other names FP8 KV cache scales are written under, as vLLM maps them: older compressed-tensors
# (`k_proj.output_scale`, the k projection's output) and ModelOpt (`k_proj.k_scale`).
_KV_SCALE_NAMES = {"self_attn.k_proj.output_scale": "self_attn.k_scale",
                   "self_attn.v_proj.output_scale": "self_attn.v_scale",
                   "self_attn.k_proj.k_scale": "self_attn.k_scale", "self_attn.v_proj.v_scale": "self_attn.v_scale"}
_KV_SCALES = ("self_attn.k_scale", "self_attn.v_scale", *_KV_SCALE_NAMES)
SCALE_SUFFIXES = _WEIGHT_SCALES + _KV_SCALES  # FP8 scales: small, their values checked (check-config reads them too)

log = logging.getLogger(__name__)


def _target(name: str) -> tuple[str, ShardId]:
    """Checkpoint tensor name -> (our parameter name, shard id for its weight_loader)."""
    for other, ours in _KV_SCALE_NAMES.items():
        if name.endswith("." + other):
            return name.removesuffix(other) + ours, None
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


def load_tensor(params: dict[str, nn.Parameter], arch: ModelArch, name: str, tensor: torch.Tensor,
                file: Path, filled: dict[tuple[str, ShardId], tuple[str, str]] | None = None,
                fp8_kv_cache: bool = False, quant: QuantConfig | None = None) -> bool:
    """Copy one checkpoint tensor into its parameter through the parameter's weight_loader (which
    checks the unsharded shape). False when the tensor is deliberately not used. With meta parameters
    and a meta tensor only the name and shape are checked: what `check-config` does from headers.
    `filled` (parameter, shard) -> (tensor, file) of the tensors loaded so far: a second tensor for the same
    part (one expert under two names, Mixtral's and Qwen's, or one name in two shards) is an error, not a
    silent overwrite. `fp8_kv_cache`: the KV cache applies the k/v scales (--kv-cache-dtype fp8), so per-head ones
    are refused; otherwise they are not used (`_per_head_kv_scale`). `quant`: the checkpoint's quantization, so a
    tensor of a module its modules_to_not_convert / ignore lists is refused naming that list."""
    if name.endswith(_IGNORED_SUFFIXES):
        return False
    if name.startswith("lm_head.") and arch.tie_word_embeddings:
        # tied: the embedding table is the output projection; a stored lm_head is not used, nor its FP8 scales (as
        # vLLM skips every lm_head. tensor of a tied model)
        return False
    pname, shard = _target(name)
    param = params.get(pname)
    module = name.rsplit(".", 1)[0]
    if param is None:
        scale = name.endswith(_WEIGHT_SCALES)
        kept_by = _kept_by(quant, module) if scale else None
        if kept_by is not None:
            raise PdlaunchError(f"tensor {name!r} in {file.name} is an FP8 scale of module {module!r}, which "
                                f"config.json's quantization_config lists in {kept_by} (kept unquantized)",
                                field="model.path",
                                hint=f"remove {module!r} from {kept_by} if the module is FP8, or drop its "
                                     "scale tensor(s) if it is stored unquantized")
        raise PdlaunchError(f"unexpected tensor {name!r} in {file.name}", field="model.path",
                            hint="an FP8 scale: config.json lacks (or does not match) the quantization_config it "
                                 "belongs to" if scale else
                                 f"the checkpoint does not match its config.json ({arch.architecture})")
    dtype_problem = weight_dtype_problem(tensor)
    if dtype_problem is not None and not tensor.is_floating_point():
        raise PdlaunchError(f"tensor {name!r} in {file.name} {dtype_problem[0]}", field="model.path",
                            hint=dtype_problem[1])
    if name.endswith(_KV_SCALES) and tensor.numel() > 1:
        return _per_head_kv_scale(name, tensor, file, fp8_kv_cache)
    if name.endswith(SCALE_SUFFIXES):
        _check_scale(name, tensor, file)
    if dtype_problem is not None:  # an e5m2 weight (an e5m2 scale failed _check_scale above)
        raise PdlaunchError(f"tensor {name!r} in {file.name} {dtype_problem[0]}", field="model.path",
                            hint=dtype_problem[1])
    # fp8 experts that quantize float tensors as they load (FusedExperts.prepare_fp8_blocks) take no fp8 one: its
    # values would be taken for real ones without their scale
    wants_fp8 = param.dtype == FP8_DTYPE and not getattr(param, "quantized_on_load", False)
    if (tensor.dtype == FP8_DTYPE) != wants_fp8:
        kept_by = _kept_by(quant, module)
        if wants_fp8:
            quantized = "config.json quantizes this module"
        elif kept_by is not None:
            quantized = f"config.json's quantization_config lists {module!r} in {kept_by} (kept unquantized)"
        elif any(p.dtype == FP8_DTYPE for p in params.values()):
            # an lm_head or MoE router the config quantizes meets its scale before this (quant/experts.py)
            quantized = "config.json does not quantize this module (modules_to_not_convert / ignore lists it, or " \
                        "it is not a linear layer)"
        else:
            quantized = "config.json has no FP8 quantization_config"
        raise PdlaunchError(f"tensor {name!r} in {file.name} is {str(tensor.dtype).removeprefix('torch.')} but "
                            f"{quantized}", field="model.path",
                            hint=f"remove {module!r} from {kept_by} if the module is FP8" if kept_by is not None
                            and tensor.dtype == FP8_DTYPE else
                            "the checkpoint does not match its config.json's quantization_config")
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


def _kept_by(quant: QuantConfig | None, module: str) -> str | None:
    """The quantization_config key whose list keeps checkpoint module `module` unquantized (modules_to_not_convert,
    ignore); None when none does. Asked only for a refusal's message: a regex list per tensor costs a load time."""
    return quant.ignore_key if quant is not None and quant.source == "checkpoint" and quant.skips(module) else None


def _per_head_kv_scale(name: str, scale: torch.Tensor, file: Path, fp8_kv_cache: bool) -> bool:
    """A k or v scale of more than one value (compressed-tensors' `attn_head` strategy: one per KV head): the FP8
    KV cache applies one k and one v scale per layer, so it is refused there; a cache of the model dtype uses no
    scale, so it is left unused (False), as the other tensors that serve no purpose here."""
    shape = tuple(scale.shape)
    if fp8_kv_cache:
        raise PdlaunchError(f"tensor {name!r} in {file.name} holds {scale.numel()} values (shape {shape}): per-head "
                            "k/v scales, which pdlaunch's FP8 KV cache (--kv-cache-dtype fp8) does not support: it "
                            "applies one k and one v scale per layer", field="model.path",
                            hint="use a checkpoint with per-tensor k/v scales (kv_cache_scheme strategy tensor), or "
                                 "--kv-cache-dtype auto, which does not use k/v scales")
    log.debug("%s in %s: per-head k/v scales %s left unused (--kv-cache-dtype auto applies none)", name, file.name,
              shape)
    return False


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


def block_scales_without_block_size(quant: QuantConfig | None,
                                    tensors: Iterable[tuple[str, Path]]) -> PdlaunchError | None:
    """The one error of a block-FP8 checkpoint (`weight_scale_inv` scales) whose `quant_method: fp8` config lacks
    weight_block_size: it reads as per-tensor FP8 (one `weight_scale` per weight), so every block scale would be an
    unexpected tensor and every weight_scale a missing one. None for any other checkpoint. `tensors`: (name, file) of
    the checkpoint's tensors, read only when the config is such a per-tensor one."""
    if quant is None or quant.quant_method != "fp8" or quant.scheme != "tensor":
        return None
    block = next(((name, file) for name, file in tensors if name.endswith(".weight_scale_inv")), None)
    if block is None:
        return None
    return PdlaunchError(f"tensor {block[0]!r} in {block[1].name} is a block FP8 scale, but "
                         "quantization_config has no weight_block_size, so quant_method fp8 reads as per-tensor FP8 "
                         "(one weight_scale per weight)", field="config.json:quantization_config.weight_block_size",
                         hint='add "weight_block_size": [128, 128] to config.json\'s quantization_config (the block '
                              "size the checkpoint was quantized with; pdlaunch loads 128x128 blocks)")
