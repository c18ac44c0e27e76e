"""Which FP8 weight format a checkpoint uses, from config.json's `quantization_config` (or the
`compression_config` older compressed-tensors checkpoints write instead), or from `--quantization fp8`
(a bf16/fp16/fp32 checkpoint quantized at load, per output channel).

Supported, all with e4m3 weights and dynamic activation scales, computed at run time per token (and 128-column
group for block weights) also where a compressed-tensors checkpoint says per tensor: a finer scaling, as vLLM's
(`_input_activations`):
- `quant_method: fp8` with `weight_block_size: [128, 128]` (DeepSeek-V3, Qwen3-*-FP8): one float32
  `weight_scale_inv` per 128x128 block, dequantized = fp8 * scale_inv;
- `quant_method: compressed-tensors`, `format: float-quantized` (llm-compressor FP8-Dynamic): a
  `weight_scale` per output channel ([out, 1]) or per tensor, or per 128x128 block;
- `quant_method: fp8` without a block size (per-tensor `weight_scale`, dynamic activations).
A compressed-tensors group without `input_activations` (FP8 weight-only, W8A16) loads too, and on an FP8 GPU runs the
same FP8 GEMMs with activations quantized per token at run time: vLLM runs such checkpoints with bf16 activations
(its Marlin weight-only kernels); per-token FP8 activations are the FP8-Dynamic accuracy, slightly below that.
Anything else (static activation scales, e5m2, other block sizes, int formats) is refused with the
config.json key that says so, and so is a quantization declared beside config.json (ModelOpt's
hf_quant_config.json, GPTQ's quantize_config.json, AWQ's quant_config.json).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from pdlaunch.errors import PdlaunchError

BLOCK = 128  # the only block edge supported: kernels and TP shard checks assume it
QUANTIZATION_METHODS = ("fp8",)  # values of --quantization
Scheme = Literal["block", "channel", "tensor"]
_FIELD = "config.json:quantization_config"


class QuantConfig(BaseModel):
    """How a checkpoint's linear weights are stored (or are to be quantized at load)."""

    model_config = ConfigDict(frozen=True)

    scheme: Scheme
    source: Literal["checkpoint", "online"]
    scale_name: str  # checkpoint tensor suffix of the weight scale: weight_scale_inv | weight_scale
    ignore: tuple[str, ...] = ()  # module names (or `re:` patterns) kept in the model dtype
    ignore_key: str = "modules_to_not_convert"  # the quantization_config key `ignore` came from, for messages
    description: str  # for /info and logs, e.g. "fp8 block 128x128 (checkpoint)"
    quant_method: str | None = None  # config.json's quant_method (fp8, compressed-tensors); None: quantized at load

    def skips(self, module: str) -> bool:
        """True when checkpoint module `module` (e.g. model.layers.0.mlp.down_proj) is not quantized. A `re:`
        pattern matches from the start of the name, as compressed-tensors (which wrote the checkpoint) and vLLM match
        it: `re:.*self_attn` keeps every attention projection unquantized, not only a module named self_attn."""
        for entry in self.ignore:
            if entry.startswith("re:"):
                if re.match(entry[3:], module):
                    return True
            elif module == entry or module.endswith("." + entry) or module.startswith(entry + "."):
                return True
        return False


_INSTEAD = "serve the model's unquantized checkpoint instead (--quantization fp8 quantizes it at load)"


def _refuse(message: str, key: str = "", hint: str | None = None) -> PdlaunchError:
    return PdlaunchError(message, field=f"{_FIELD}.{key}" if key else _FIELD,
                         hint=hint or "pdlaunch loads e4m3 FP8 checkpoints with 128x128 block, per-channel or "
                                      f"per-tensor weight scales and dynamic activation scales; {_INSTEAD}")


def _object(value: object, key: str) -> dict[str, object]:
    """A JSON object of quantization_config (`key` names it)."""
    if not isinstance(value, dict):
        raise _refuse(f"{key or 'quantization_config'} {value!r} is not a JSON object", key,
                      "restore the checkpoint's original config.json")
    return value


def _module_names(cfg: Mapping[str, object], key: str) -> tuple[str, ...]:
    """modules_to_not_convert / ignored_layers / ignore: a list of module names or `re:` patterns (a string
    would be read a character at a time)."""
    value = cfg.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _refuse(f"{key} {value!r} is not a list of module names", key,
                      'list the modules kept unquantized, e.g. ["lm_head"]')
    for entry in (v for v in value if v.startswith("re:")):
        try:
            re.compile(entry[3:])
        except re.error as exc:
            raise _refuse(f"{key} entry {entry!r} is not a valid regular expression ({exc})", key,
                          "fix the pattern after `re:`") from None
    return tuple(value)


def _block_fp8(cfg: dict[str, Any]) -> QuantConfig:
    fmt = cfg.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _refuse(f"FP8 format {fmt!r} is not supported (only e4m3)", "fmt")
    scheme = cfg.get("activation_scheme", "dynamic")
    if not isinstance(scheme, str) or scheme.lower() != "dynamic":  # transformers lowercases it
        static = " (calibrated input_scale tensors)" \
            if isinstance(scheme, str) and scheme.lower() == "static" else ""
        raise _refuse(f"activation_scheme {cfg.get('activation_scheme')!r}{static} is not supported: pdlaunch "
                      "computes activation scales at run time (only dynamic)", "activation_scheme",
                      "use an FP8 checkpoint with activation_scheme dynamic (or compressed-tensors FP8-Dynamic), or "
                      "the bf16 original with --quantization fp8")
    kept, ignored_layers = _module_names(cfg, "modules_to_not_convert"), _module_names(cfg, "ignored_layers")
    ignore = kept + ignored_layers
    ignore_key = " / ".join(key for key, names in (("modules_to_not_convert", kept), ("ignored_layers", ignored_layers))
                            if names) or "modules_to_not_convert"
    block = cfg.get("weight_block_size")
    if block is None:
        return QuantConfig(scheme="tensor", source="checkpoint", scale_name="weight_scale", ignore=ignore,
                           ignore_key=ignore_key, description="fp8 per-tensor (checkpoint)", quant_method="fp8")
    if not isinstance(block, list) or block != [BLOCK, BLOCK]:
        raise _refuse(f"weight_block_size {block} is not supported (only [{BLOCK}, {BLOCK}])", "weight_block_size")
    return QuantConfig(scheme="block", source="checkpoint", scale_name="weight_scale_inv", ignore=ignore,
                       ignore_key=ignore_key, description=f"fp8 block {BLOCK}x{BLOCK} (checkpoint)", quant_method="fp8")


def _scheme(group: dict[str, object]) -> str:
    """What a compressed-tensors group quantizes, for a refusal: "int 8-bit weights, int 8-bit activations" (W8A8),
    "int 4-bit weights" (W4A16); empty when it says neither."""
    parts = []
    for args, what in ((group.get("weights"), "weights"), (group.get("input_activations"), "activations")):
        if isinstance(args, dict) and args.get("num_bits") is not None:
            dynamic = " dynamic" if what == "weights" and args.get("dynamic") else ""
            parts.append(f"{args.get('type', '?')} {args['num_bits']}-bit{dynamic} {what}")
    return ", ".join(parts)


def _compressed_tensors(cfg: dict[str, Any]) -> QuantConfig:
    sparsity = cfg.get("sparsity_config")
    sparse_format = _object(sparsity, "sparsity_config").get("format") if sparsity is not None else None
    if sparse_format not in (None, "dense"):  # "dense" stores whole weights: they load as they are
        raise _refuse(f"sparsity_config format {sparse_format!r} is not supported: its weights are stored compressed "
                      "(values and a bitmask), not as matrices", "sparsity_config.format",
                      "use a checkpoint saved with dense weights (sparsity_config format dense, or none)")
    groups = _object(cfg.get("config_groups") or {}, "config_groups")
    if len(groups) != 1:
        raise _refuse(f"{len(groups)} config_groups; pdlaunch supports exactly one", "config_groups")
    name, group = next(iter(groups.items()))
    key = f"config_groups.{name}"
    group = _object(group, key)
    # the group's own format, else the checkpoint-wide one (where llm-compressor writes it): the error names that key
    fmt, fmt_key = (group["format"], f"{key}.format") if group.get("format") else (cfg.get("format"), "format")
    if fmt != "float-quantized":
        what = f" ({_scheme(group)})" if _scheme(group) else ""
        raise _refuse(f"compressed-tensors format {fmt!r}{what} is not supported (only float-quantized: FP8 weights)",
                      fmt_key)
    if group.get("targets") != ["Linear"]:
        raise _refuse(f"targets {group.get('targets')} are not supported (only [\"Linear\"])", f"{key}.targets")
    weights = _object(group.get("weights") or {}, f"{key}.weights")
    if weights.get("num_bits") != 8 or weights.get("type") != "float" or weights.get("dynamic"):
        raise _refuse(f"weights must be static 8-bit float; the group quantizes {_scheme(group) or 'no weights'}",
                      f"{key}.weights")
    acts = group.get("input_activations")
    if acts is not None:
        _input_activations(_object(acts, f"{key}.input_activations"), f"{key}.input_activations")
    _kv_cache_scheme(cfg.get("kv_cache_scheme"))
    ignore = _module_names(cfg, "ignore")
    strategy = weights.get("strategy")
    if strategy == "block":
        block = weights.get("block_structure")
        if not isinstance(block, list) or block != [BLOCK, BLOCK]:
            raise _refuse(f"block_structure {block} is not supported (only [{BLOCK}, {BLOCK}])",
                          f"{key}.weights.block_structure")
        return QuantConfig(scheme="block", source="checkpoint", scale_name="weight_scale", ignore=ignore,
                           ignore_key="ignore", description=f"fp8 block {BLOCK}x{BLOCK} (compressed-tensors)",
                           quant_method="compressed-tensors")
    if strategy not in ("channel", "tensor"):
        raise _refuse(f"weight strategy {strategy!r} is not supported (channel, tensor or block)",
                      f"{key}.weights.strategy")
    return QuantConfig(scheme=strategy, source="checkpoint", scale_name="weight_scale", ignore=ignore,
                       ignore_key="ignore", description=f"fp8 per-{strategy} (compressed-tensors)",
                       quant_method="compressed-tensors")


def _input_activations(acts: dict[str, object], key: str) -> None:
    """A group's input_activations: dynamic (scales computed at run time), per token, per token and group, or per
    tensor. vLLM takes any dynamic scheme (compressed-tensors' `_is_fp8_w8a8`) and quantizes a per-tensor one per
    token all the same (CompressedTensorsW8A8Fp8: PER_TOKEN unless the input scheme is static); so does pdlaunch.
    A token's scale is its own amax / 448 where the tensor's is the whole step's amax / 448: never coarser, so per
    token is at least as accurate. Static input scales (calibrated `input_scale` tensors) are refused."""
    if acts.get("num_bits", 8) != 8 or acts.get("type", "float") != "float":
        raise _refuse(f"input_activations quantize to {acts.get('type', 'float')} {acts.get('num_bits', 8)}-bit; "
                      "pdlaunch quantizes activations to 8-bit float (e4m3)", key)
    if not acts.get("dynamic"):
        raise _refuse(f"static input_activations (dynamic {acts.get('dynamic')!r}: calibrated input_scale "
                      "tensors) are not supported: pdlaunch computes activation scales at run time",
                      f"{key}.dynamic", "use an FP8-Dynamic checkpoint (input_activations dynamic: true), or the bf16 "
                                        "original with --quantization fp8")
    strategy = acts.get("strategy")
    if strategy not in ("token", "group", "tensor"):
        raise _refuse(f"input_activations strategy {strategy!r} is not supported (token, group or tensor)",
                      f"{key}.strategy")


def _kv_cache_scheme(scheme: object) -> None:
    """The scheme of the checkpoint's k/v scale tensors: --kv-cache-dtype fp8 divides by them as e4m3 scales, so
    those of another format (an int8 KV cache's amax / 127) are refused, as vLLM refuses them; per-head scales
    are judged where they load, by their shape (model/checkpoint_tensors.py: refused under --kv-cache-dtype fp8,
    left unused otherwise)."""
    if scheme is None:
        return
    found = _object(scheme, "kv_cache_scheme")
    if found.get("num_bits") != 8 or found.get("type") != "float":
        raise _refuse(f"kv_cache_scheme quantizes the KV cache to {found.get('type', '?')} {found.get('num_bits', '?')}"
                      "-bit; pdlaunch's FP8 KV cache reads only 8-bit float (e4m3) k/v scales", "kv_cache_scheme",
                      "use a checkpoint whose kv_cache_scheme is 8-bit float, or none")


def parse_quant_config(cfg: object) -> QuantConfig | None:
    """config.json's `quantization_config` (any JSON value: what is not an object is refused) -> QuantConfig
    (None: not quantized)."""
    if not cfg:
        return None
    found = _object(cfg, "")
    method = found.get("quant_method")
    if method is None:
        raise _refuse("quantization_config names no quant_method", "quant_method",
                      "restore the checkpoint's original config.json (an FP8 checkpoint says `\"quant_method\": "
                      "\"fp8\"` or `\"compressed-tensors\"`)")
    if method == "fp8":
        return _block_fp8(found)
    if method == "compressed-tensors":
        return _compressed_tensors(found)
    raise _refuse(f"quant_method {method!r} is not supported", "quant_method",
                  "pdlaunch loads fp8 (block or per-tensor) and compressed-tensors float-quantized checkpoints; "
                  + _INSTEAD)


def online_quant_config() -> QuantConfig:
    """`--quantization fp8`: the checkpoint's weights quantized at load, one scale per output channel."""
    return QuantConfig(scheme="channel", source="online", scale_name="weight_scale",
                       description="fp8 per-channel (quantized at load)")


# Quantization a checkpoint declares beside config.json, which pdlaunch does not load (ModelOpt, AutoGPTQ, AutoAWQ):
# without this its packed or FP8 tensors were refused as not matching a config.json that "has no quantization".
_SIDE_FILES = {"hf_quant_config.json": "ModelOpt", "quantize_config.json": "GPTQ", "quant_config.json": "AWQ"}


def _declared(cfg: object) -> tuple[str, object]:
    """(config.json key, value) of the checkpoint's quantization: `quantization_config`, else `compression_config`
    (the key compressed-tensors wrote before it used quantization_config; vLLM reads it too)."""
    if not isinstance(cfg, dict):
        return "quantization_config", None  # load_arch reports a config.json that is not an object
    if cfg.get("quantization_config") is None and cfg.get("compression_config") is not None:
        found = cfg["compression_config"]
        if isinstance(found, dict) and "quant_method" not in found:  # compressed-tensors' own key names no method
            found = {**found, "quant_method": "compressed-tensors"}
        return "compression_config", found
    return "quantization_config", cfg.get("quantization_config")


def _is_file(path: Path) -> bool:
    """Path.is_file, False where the path cannot be asked (a name too long, no permission): the checkpoint rules
    report an unreadable model path on their own."""
    try:
        return path.is_file()
    except OSError:
        return False


def _side_file_refusal(directory: Path) -> PdlaunchError | None:
    """The error naming a quantization file beside config.json (config.json itself declares none), or None."""
    for name, method in _SIDE_FILES.items():
        if _is_file(directory / name):
            return PdlaunchError(f"{directory / name} says the weights are {method}-quantized, which pdlaunch does "
                                 "not load", field="model.path",
                                 hint="pdlaunch loads bf16/fp16/fp32 checkpoints and FP8 ones whose config.json has "
                                      "a quantization_config (fp8 or compressed-tensors float-quantized)")
    return None


def load_quant_config(directory: Path, quantization: str | None = None) -> QuantConfig | None:
    """The checkpoint's FP8 format, or the online one `quantization` asks for (None: unquantized).

    `--quantization fp8` on a checkpoint that is already FP8 keeps the checkpoint's scales."""
    path = Path(directory) / "config.json"
    try:
        key, raw = _declared(json.loads(path.read_text()) if _is_file(path) else None)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        key, raw = "quantization_config", None  # load_arch reports the unreadable config.json
    try:
        found = parse_quant_config(raw)
    except PdlaunchError as exc:
        if key == "quantization_config":
            raise
        # the same checks, the key the checkpoint spells named
        raise PdlaunchError(exc.message, (exc.field or _FIELD).replace(_FIELD, f"config.json:{key}", 1),
                            exc.hint) from None
    if found is None and _is_file(path):
        refusal = _side_file_refusal(Path(directory))
        if refusal is not None:
            raise refusal
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise PdlaunchError(f"unknown quantization {quantization!r}", field="model.quantization",
                            hint=f"use one of: {', '.join(QUANTIZATION_METHODS)} (or leave it unset)")
    if found is None and quantization == "fp8":
        return online_quant_config()
    return found
