"""check-config opens what serve opens: the tokenizer, every safetensors header, every tensor's shape.

Weights are never read: shapes come from the file headers and are fed as meta tensors through the
loader's own `load_tensor` (the weight_loader of each parameter), so check-config and the load
agree on every name and shape by construction. FP8 scales (a few KiB each) are read, so that a NaN or
negative one is refused here as the load refuses it. A block-FP8 checkpoint's projections must also split
on 128 edges at the TP size of every instance group (each rank's block scales cover whole blocks): `block_fp8_tp_rule`,
which tp_problems reports with the other TP rules.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.topology_config import group_kv_cache_dtype
from pdlaunch.errors import PdlaunchError

if TYPE_CHECKING:
    import torch

    from pdlaunch.model.arch import ModelArch
    from pdlaunch.model.quant.config import QuantConfig
    from pdlaunch.model.tokenizer import Tokenizer
    from pdlaunch.model.tp_split import TPRule
    from pdlaunch.model.weight_files import TensorHeader
    from pdlaunch.model.weight_loader import ShardId

# safetensors dtype names -> torch attribute names (an unknown one is reported, not guessed)
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                       "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
                       "U64": "uint64"}
MAX_TENSOR_PROBLEMS = 5  # a checkpoint of another model would otherwise print one line per tensor
MAX_SCALE_BYTES = 1 << 20  # a block scale of a 65536 x 65536 weight is 1 MiB in float32


def as_problem(exc: PdlaunchError, default_field: str = "model.path") -> Problem:
    """A model-side PdlaunchError as a config problem (config.json keys are named in the message)."""
    field = exc.field if exc.field and not exc.field.startswith("config.json:") else default_field
    where = f" ({exc.field})" if exc.field and exc.field.startswith("config.json:") else ""
    return problem(field, exc.message + where, exc.hint or "use a complete checkpoint that matches its config.json")


def checkpoint_problems(model_path: str, quantization: str | None = None, fp8_kv_cache: bool = False) -> list[Problem]:
    """What serve would fail on when it opens this checkpoint directory or GGUF file (the demo is built by us).
    FP8 checkpoints: the quantization_config is supported and every scale tensor has its weight's shape
    (`fp8_kv_cache`: an instance runs --kv-cache-dtype fp8, which refuses per-head k/v scales)."""
    if model_path in ("demo", "tiny"):
        return []
    if model_path.lower().endswith(".gguf"):
        return gguf_file_problems(Path(os.path.expanduser(model_path)))
    directory = Path(os.path.expanduser(model_path))
    from pdlaunch.model.arch import load_arch
    from pdlaunch.model.checkpoint import open_tokenizer  # lazy: imports torch
    from pdlaunch.model.quant.config import load_quant_config

    problems: list[Problem] = []
    tokenizer = None
    try:
        tokenizer = open_tokenizer(directory)
    except PdlaunchError as exc:
        problems.append(as_problem(exc))
    try:
        arch = load_arch(directory)
        quant = load_quant_config(directory, quantization)
    except PdlaunchError as exc:
        return problems + [as_problem(exc)]
    if tokenizer is not None:
        problems += _tokenizer_problems(tokenizer, arch)
    return problems + weight_problems(directory, arch, quant, fp8_kv_cache)


def runs_fp8_kv_cache(cfg: DeploymentConfig) -> bool:
    """Whether an instance of `cfg` runs an fp8 KV cache (a group's own kv_cache_dtype, else cache.kv_cache_dtype):
    the checkpoint's k/v scales are then applied, and so checked as such."""
    groups = [group for group in cfg.instances if group.count]
    if not groups:
        return cfg.cache.kv_cache_dtype == "fp8"
    return any(group_kv_cache_dtype(cfg.cache, group) == "fp8" for group in groups)


def _tokenizer_problems(tokenizer: Tokenizer, arch: ModelArch) -> list[Problem]:
    """Token ids the tokenizer would put in a prompt that lie past the embedding table: the engine refuses every
    request holding one, at run time."""
    if tokenizer.vocab_size > arch.vocab_size:
        return [problem("model.path", f"tokenizer.json has {tokenizer.vocab_size} tokens but config.json's "
                        f"vocab_size is {arch.vocab_size}", "use the tokenizer that belongs to these weights")]
    bos = tokenizer.bos_token_id
    if tokenizer.add_bos_token and bos is not None and not 0 <= bos < arch.vocab_size:
        # only generation_config.json's bos_token_id can be one: a BOS named by its text is a tokenizer.json token
        return [problem("model.path", f"the BOS token id {bos} (generation_config.json:bos_token_id) that "
                        f"tokenizer_config.json's add_bos_token puts before every prompt is outside config.json's "
                        f"vocab_size {arch.vocab_size}: every request would be refused",
                        "use the generation_config.json that belongs to these weights")]
    return []


def gguf_file_problems(path: Path) -> list[Problem]:
    """Tensors, shapes, tokenizer and quant types of a GGUF file, from its header (no weight is dequantized)."""
    # lazy: imports numpy and the gguf package
    from pdlaunch.model.gguf import check as gguf_check
    from pdlaunch.model.gguf import metadata as gguf_metadata

    try:
        reader = gguf_metadata.open_reader(path)
    except PdlaunchError as exc:
        return [as_problem(exc)]
    return [as_problem(exc) for exc in gguf_check.gguf_problems(reader)]


def _headers(directory: Path) -> tuple[list[TensorHeader], list[Problem]]:
    """Every tensor header of the checkpoint, and the problems with its files and index."""
    from pdlaunch.model.weight_files import index_map, read_header, safetensors_files

    try:
        files = safetensors_files(directory)
        weight_map = index_map(directory)
    except PdlaunchError as exc:
        return [], [as_problem(exc)]
    headers: list[TensorHeader] = []
    problems: list[Problem] = []
    for file in files:
        try:
            headers += read_header(file)
        except PdlaunchError as exc:
            problems.append(as_problem(exc))
    if weight_map is not None and not problems:
        where = {(h.name, h.file) for h in headers}
        for name, shard in sorted(weight_map.items()):
            if (name, directory / shard) not in where:  # a shard in a subdirectory: its path, as the load opens it
                problems.append(problem("model.path", f"model.safetensors.index.json puts {name!r} in {shard}, "
                                        "which does not hold it", "re-download the checkpoint: its shards and "
                                        "index do not match"))
                break
    return headers, problems


def weight_problems(directory: Path, arch: ModelArch, quant: QuantConfig | None = None,
                    fp8_kv_cache: bool = False) -> list[Problem]:
    """Files readable, headers valid, every needed tensor present with the loader's shape and a float dtype
    (`fp8_kv_cache`: as load_model's)."""
    import torch

    from pdlaunch.model import loader
    from pdlaunch.model.checkpoint_tensors import block_scales_without_block_size, load_tensor, missing_tensors

    headers, problems = _headers(directory)
    if problems:
        return problems  # tensors of an unreadable file cannot be checked
    no_block_size = block_scales_without_block_size(quant, ((h.name, h.file) for h in headers))
    if no_block_size is not None:  # each block scale would be "unexpected", each weight_scale missing
        return [as_problem(no_block_size)]
    try:
        params = dict(loader.meta_model(arch, torch.float32, quant=quant).named_parameters())
    except PdlaunchError as exc:
        return [as_problem(exc)]
    seen: set[str] = set()
    filled: dict[tuple[str, ShardId], tuple[str, str]] = {}
    found: list[Problem] = []
    experts = loader.expert_dequantizer(arch, quant)
    for header in headers:
        dtype = _torch_dtype(header.dtype)
        if dtype is None:
            found.append(problem("model.path", f"tensor {header.name!r} in {header.file.name} has dtype "
                                 f"{header.dtype}, which pdlaunch cannot load", "use float32, bfloat16 or float16 "
                                 "weights, or FP8 (e4m3) ones with a quantization_config"))
            seen.add(header.name)  # present, with the problem just named: not also "missing"
            continue
        try:
            scale = _scale_values(header, dtype)
            meta = scale if scale is not None else torch.empty(header.shape, dtype=dtype, device="meta")
            for name, tensor in experts.feed(header.name, meta) if experts is not None else [(header.name, meta)]:
                if load_tensor(params, arch, name, tensor, header.file, filled, fp8_kv_cache, quant):
                    seen.add(name)
        except PdlaunchError as exc:
            found.append(as_problem(exc))
            seen.add(header.name)  # present, with the problem just named: not also "missing"
            if experts is not None:  # an expert's scale refused: its weight was present too
                seen.add(experts.weight_name(header.name) or header.name)
    unpaired = experts.check_complete() if experts is not None else None
    if unpaired is not None:
        found.append(as_problem(unpaired))
        # named above: a weight waiting for its scale is present, a scale without its weight is that one problem
        seen.update(experts.pending() if experts is not None else ())
    missing = missing_tensors(params, seen, arch)
    if missing is not None:
        found.append(as_problem(missing))
    if len(found) > MAX_TENSOR_PROBLEMS:
        more = len(found) - MAX_TENSOR_PROBLEMS
        found = found[:MAX_TENSOR_PROBLEMS] + [problem("model.path", f"{more} more tensor problem(s)",
                                                       "the checkpoint does not match its config.json")]
    return found


def _scale_values(header: TensorHeader, dtype: torch.dtype) -> torch.Tensor | None:
    """An FP8 weight or KV scale with its values (a few KiB each), so the loader's checks of them (NaN, inf,
    negative) refuse here what the load would refuse; None for every other tensor (weights stay unread)."""
    import torch

    from pdlaunch.model.checkpoint_tensors import SCALE_SUFFIXES

    if not header.name.endswith(SCALE_SUFFIXES) or header.nbytes > MAX_SCALE_BYTES or not header.nbytes:
        return None
    return torch.frombuffer(bytearray(header.read()), dtype=torch.uint8).view(dtype).reshape(header.shape)


def _torch_dtype(name: str) -> torch.dtype | None:
    import torch

    dtype = getattr(torch, _SAFETENSORS_DTYPES.get(name, ""), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def block_fp8_tp_rule(cfg: DeploymentConfig) -> TPRule | None:
    """The TP rule of a block-FP8 checkpoint (model/quant/block_tp.py: which projections a TP size cuts off the
    128-wide scale blocks), which tp_problems reports beside the split rules per instance group; None for any other
    model. One off a 128 edge at TP 1 already is the checkpoint's problem, not a group's (weight_problems)."""
    from pdlaunch.model.arch import load_arch  # layering: lazy (torch stays off config-only paths)
    from pdlaunch.model.quant.block_tp import block_tp_rule  # torch-free
    from pdlaunch.model.quant.config import load_quant_config

    if cfg.model.path in ("demo", "tiny") or cfg.model.path.lower().endswith(".gguf"):
        return None
    directory = Path(os.path.expanduser(cfg.model.path))
    try:
        quant = load_quant_config(directory, cfg.model.quantization)
        arch = load_arch(directory)
    except PdlaunchError:
        return None  # reported by checkpoint_problems
    return block_tp_rule(arch, quant)
