"""What a local HF checkpoint directory says without its weights: `load_checkpoint` (config.json, the
quantization_config and the tokenizer), and the dtype its weights are loaded and computed in (`resolve_dtype`,
`weight_dtype_name`). The weights themselves are model/loader.py's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import ModelArch, load_arch
from pdlaunch.model.demo import BUILT_IN_MODELS, resolve_model_path
from pdlaunch.model.quant.config import QuantConfig, load_quant_config
from pdlaunch.model.quant.linear import fp8_gemm_available
from pdlaunch.model.tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
