"""Load a local HF checkpoint: `load_checkpoint` (config + tokenizer) and `load_model` (weights).

The model is built on the meta device (no memory), its parameters are then allocated once on
the target device, and each checkpoint tensor is copied in place through the parameter's own
`weight_loader` (which takes this rank's tensor-parallel shard). Every parameter must be filled
and every checkpoint tensor must be used, otherwise the error names the tensor.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import ModelArch, load_arch
from pdlaunch.model.demo import resolve_model_path
from pdlaunch.model.layers import default_weight_loader
from pdlaunch.model.llama import CausalLM
from pdlaunch.model.tokenizer import Tokenizer

PROGRESS_BAR_MIN_BYTES = 1 << 30
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Checkpoint:
    """What a checkpoint directory says, without its weights."""

    arch: ModelArch
    tokenizer: Tokenizer
    path: Path
    name: str  # served model name: "demo" or the directory name


def load_checkpoint(path_or_demo: str) -> Checkpoint:
    """Parse config.json and the tokenizer of a checkpoint directory (or `demo`)."""
    path = resolve_model_path(path_or_demo)
    arch = load_arch(path)
    tokenizer = Tokenizer(path)
    name = "demo" if path_or_demo == "demo" else path.resolve().name
    return Checkpoint(arch=arch, tokenizer=tokenizer, path=path, name=name)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on CUDA, float32 elsewhere; otherwise the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise PdlaunchError(f"unknown dtype {dtype!r}", field="model.dtype", hint=f"use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: those named by model.safetensors.index.json, else *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise PdlaunchError(f"cannot read {index}: {exc}", field="model.path") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise PdlaunchError(f"{file} is missing (listed in {index.name})", field="model.path",
                                    hint="copy every shard of the checkpoint")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PdlaunchError(
            f"no *.safetensors weights in {path}",
            field="model.path",
            hint="pdlaunch loads safetensors only; convert .bin/.pt weights with transformers' save_pretrained",
        )
    return files


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate every meta parameter on `device`, keeping ties and weight_loader attributes."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:
                new = nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
                if hasattr(param, "weight_loader"):
                    new.weight_loader = param.weight_loader  # type: ignore[attr-defined]
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
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name), file


def _target(name: str) -> tuple[str, object]:
    """Checkpoint tensor name -> (our parameter name, shard id for its weight_loader)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in CausalLM.PACKED_MODULES:
            packed, shard = CausalLM.PACKED_MODULES[part]
            return ".".join(parts[:i] + [packed] + parts[i + 1:]), shard
    return name, None


def _expected_names(params: dict[str, nn.Parameter]) -> set[str]:
    """Checkpoint tensor names the model needs (packed parameters expand to their parts)."""
    unpack: dict[str, list[str]] = {}
    for ckpt_name, (packed, _) in CausalLM.PACKED_MODULES.items():
        unpack.setdefault(packed, []).append(ckpt_name)
    names: set[str] = set()
    for pname in params:
        parts = pname.split(".")
        packed = next((i for i, p in enumerate(parts) if p in unpack), None)
        if packed is None:
            names.add(pname)
        else:
            names.update(".".join(parts[:packed] + [u] + parts[packed + 1:]) for u in unpack[parts[packed]])
    return names


def load_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
               tp_rank: int = 0, tp_size: int = 1) -> CausalLM:
    """Build the model on the meta device and load the checkpoint's weights in place."""
    device = torch.device(device)
    files = safetensors_files(ckpt.path)
    with torch.device("meta"):
        model = CausalLM(ckpt.arch, tp_rank, tp_size)
    model.to(dtype)  # meta: changes dtypes only, allocates nothing
    _materialize(model, device)
    model.eval()

    params = dict(model.named_parameters())
    expected = _expected_names(params)
    seen: set[str] = set()
    total_bytes = sum(f.stat().st_size for f in files)
    show_bar = total_bytes > PROGRESS_BAR_MIN_BYTES and sys.stdout.isatty()
    progress = None
    if show_bar:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("loading {task.description}"), BarColumn(), DownloadColumn(),
                            TimeRemainingColumn())
        task = progress.add_task(ckpt.name, total=total_bytes)
        progress.start()
    try:
        with torch.no_grad():
            for name, tensor, file in _iter_tensors(files):
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and ckpt.arch.tie_word_embeddings:
                    continue  # tied: the embedding table is the output projection
                pname, shard = _target(name)
                param = params.get(pname)
                if param is None:
                    raise PdlaunchError(
                        f"unexpected tensor {name!r} in {file.name}",
                        field="model.path",
                        hint=f"the checkpoint does not match its config.json ({ckpt.arch.architecture})",
                    )
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    loader(param, tensor, shard)
                except ValueError as exc:
                    raise PdlaunchError(f"tensor {name!r} in {file.name}: {exc}", field="model.path",
                                        hint="the checkpoint does not match its config.json") from exc
                seen.add(name)
                if progress is not None:
                    progress.advance(task, tensor.numel() * tensor.element_size())
    finally:
        if progress is not None:
            progress.stop()
    missing = sorted(expected - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise PdlaunchError(
            f"checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}",
            field="model.path",
            hint="the checkpoint is incomplete or does not match its config.json",
        )
    return model
