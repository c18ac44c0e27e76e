"""A random-weight checkpoint of a real model's shape (checkpoint_shapes.py) on local disk, for benchmarks:
config.json, generation_config.json, the tokenizer's files (checkpoint_tokenizer.py) and sharded safetensors of
random weights (random_weights.py, FP8 with `fp8`) with model.safetensors.index.json.
Written shard by shard: at most one shard (`max_shard_bytes`) is in memory at a time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from pdlaunch.bench.checkpoint_shapes import SHAPES, tensor_shapes
from pdlaunch.bench.checkpoint_tokenizer import TOKENIZER_FILES, write_tokenizer
from pdlaunch.bench.random_weights import FP8_FORMATS, SEED_LIMIT, fp8_quant_config, random_tensors, weight_bytes
from pdlaunch.config.rules.host import make_output_dir
from pdlaunch.errors import PdlaunchError
from pdlaunch.memory.platform import resolve_device
from pdlaunch.model.arch import HFConfigJson
from pdlaunch.model.demo_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, generation_config

# A checkpoint's weight files as Hugging Face names them: one file, shards, their index.
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise PdlaunchError(f"unknown dtype {name!r}", field="--dtype", hint=f"one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], itemsize: int,
                max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split in file order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def make_llama3_8b_shaped(out_dir: Path | str, **kwargs: Any) -> Path:
    """`make_shaped_checkpoint` of the Llama-3-8B shape."""
    return make_shaped_checkpoint(out_dir, shape="llama3-8b", **kwargs)


def make_shaped_checkpoint(
    out_dir: Path | str,
    *,
    shape: str = "llama3-8b",
    num_layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_bytes: int = 4 * 2**30,
    overrides: HFConfigJson | None = None,
    overwrite: bool = False,
    progress: bool = False,
    device: str = "cpu",
    fp8: str | None = None,
) -> Path:
    """Write config.json, generation_config.json, tokenizer files and sharded safetensors with
    model.safetensors.index.json. `overrides` changes config keys (e.g. a tiny hidden_size for tests).
    Returns the checkpoint folder."""
    out = Path(out_dir)
    device = resolve_device(device)
    if device != "cpu" and not (device.split(":")[0] == "cuda" and torch.cuda.is_available()):
        raise PdlaunchError(f"cannot draw weights on {device!r}", field="--device",
                            hint="auto, cpu, or cuda[:N] on a machine with a CUDA device")
    if out.exists() and not out.is_dir():
        raise PdlaunchError(f"{out} is a file, not a folder", field="OUT_DIR", hint="give a folder to write into")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PdlaunchError(f"{out} is not empty", field="OUT_DIR", hint="pick an empty folder or pass --overwrite")
    if fp8 is not None and fp8 not in FP8_FORMATS:
        raise PdlaunchError(f"unknown FP8 format {fp8!r}", field="--fp8", hint=f"one of {', '.join(FP8_FORMATS)}")
    if shape not in SHAPES:
        raise PdlaunchError(f"unknown shape {shape!r}", field="--shape", hint=f"one of {', '.join(SHAPES)}")
    if abs(seed) >= SEED_LIMIT:  # seed * 1_000_003 + crc32 must fit torch's 64-bit generator seed
        raise PdlaunchError(f"{seed} is out of range", field="--seed", hint="give a seed of magnitude below 2**43")
    base = SHAPES[shape]
    num_layers = base["num_hidden_layers"] if num_layers is None else num_layers
    if num_layers < 1:
        raise PdlaunchError("must be at least 1", field="--num-layers",
                            hint=f"{base['num_hidden_layers']} is the real {shape} depth")
    cfg: HFConfigJson = {**base, "num_hidden_layers": num_layers, **(overrides or {})}
    resized = {"hidden_size", "num_attention_heads"} & set(overrides or {})
    if resized and "head_dim" not in (overrides or {}):
        # a test's tiny width without its own head_dim; a real shape keeps its own (Qwen3-30B-A3B's 128 is not
        # hidden_size / num_attention_heads = 64)
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise PdlaunchError("num_attention_heads must be a multiple of num_key_value_heads", field="overrides")
    cfg |= {"torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID}
    itemsize = torch.empty((), dtype=dtype).element_size()
    _check_free_space(out, _checkpoint_bytes(cfg, itemsize, fp8))
    existed = out.exists()
    make_output_dir(out, "OUT_DIR")
    for path in _earlier_weights(out):  # --overwrite: another shard count left shards the new index does not name
        path.unlink()
    shards = plan_shards(tensor_shapes(cfg), itemsize, max_shard_bytes)
    written: list[Path] = []
    try:
        _write_checkpoint(out, cfg, shards, dtype, seed, device, fp8, progress, written)
    except BaseException as exc:
        # a folder of some shards and no config.json is no checkpoint, and a rerun would call it "not empty"
        _remove(written, out if not existed else None)
        if isinstance(exc, KeyboardInterrupt) and progress:
            print(f"interrupted: the files written so far were removed from {out}", file=sys.stderr)
        if isinstance(exc, OSError | SafetensorError):  # the disk filled up, or the folder went away
            raise PdlaunchError(f"cannot write the checkpoint into {out}: {_write_failure(exc)}", field="OUT_DIR",
                                hint="the files written so far were removed; free space there or give another "
                                "folder") from None
        raise
    return out


def _checkpoint_bytes(cfg: HFConfigJson, itemsize: int, fp8: str | None) -> int:
    """The weights' bytes from a one- and a two-layer model (every layer of a SHAPES model is alike): listing
    the tensors of a --num-layers typed with a few zeros too many would take longer than refusing it."""
    one, two = (weight_bytes(tensor_shapes({**cfg, "num_hidden_layers": n}), itemsize, fp8) for n in (1, 2))
    return one + (cfg["num_hidden_layers"] - 1) * (two - one)


def _check_free_space(out: Path, needed: int) -> None:
    """Refuse before the first shard a checkpoint the disk cannot hold, rather than fill the disk and fail on the
    last shard. With --overwrite the weights already in `out` count as free: they are replaced."""
    there = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(there).free
    if out.is_dir():
        free += sum(f.stat().st_size for f in _earlier_weights(out))
    if needed > free:
        raise PdlaunchError(f"the checkpoint takes {needed / 2**30:,.1f} GiB but the disk holding {out} has "
                            f"{free / 2**30:,.1f} GiB free", field="OUT_DIR",
                            hint="free space there, give a folder on another disk, or fewer --num-layers")


def _earlier_weights(out: Path) -> list[Path]:
    """The weight files of a checkpoint already in `out`, by the names a Hugging Face checkpoint gives them
    (`model.safetensors`, `model-00001-of-00003.safetensors`, the index), which --overwrite replaces; a file of
    another name is the user's."""
    if not out.is_dir():
        return []
    return [f for f in out.iterdir() if _WEIGHT_FILE.fullmatch(f.name) and f.is_file()]


def _remove(files: list[Path], folder: Path | None) -> None:
    """Each of `files`, then `folder` once it is empty; what cannot be removed (the folder went away) stays."""
    with contextlib.suppress(OSError):
        for path in files:
            path.unlink(missing_ok=True)
        if folder is not None and not any(folder.iterdir()):
            folder.rmdir()


def _write_failure(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc).removeprefix("Error while serializing: ")  # safetensors' wording of an I/O error


def _write_checkpoint(out: Path, cfg: HFConfigJson, shards: list[list[tuple[str, tuple[int, ...]]]],
                      dtype: torch.dtype, seed: int, device: str, fp8: str | None, progress: bool,
                      written: list[Path]) -> None:
    """The shards, then the index, config and tokenizer files; every path goes into `written` before it is
    opened, so that a failure partway can remove each one."""
    weight_map: dict[str, str] = {}
    total = 0
    umask = os.umask(0o077)  # read back at once (os has no getter); nothing is created between the two calls
    os.umask(umask)
    file_mode = 0o666 & ~umask  # what open() gives the config and tokenizer files
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        std = cfg["initializer_range"]
        tensors = {key: t for name, shape in shard
                   for key, t in random_tensors(name, shape, dtype, seed, std, device, fp8).items()}
        written.append(out / fname)
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        # safetensors writes 0600: readable as the config is, by another user too. A courtesy, not part of the
        # write: a filesystem without modes (vfat, a CIFS share) or a shard another user made (--overwrite in a
        # shared folder: only a file's owner may chmod it) refuses it, and the checkpoint is whole without it.
        with contextlib.suppress(PermissionError):
            (out / fname).chmod(file_mode)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
        if progress:
            print(f"wrote {fname} ({k}/{len(shards)})", flush=True)

    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if fp8 is not None:
        cfg["quantization_config"] = fp8_quant_config(fp8)
    written += [out / name for name in ("model.safetensors.index.json", "config.json", "generation_config.json",
                                        *TOKENIZER_FILES)]
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config(), indent=2) + "\n")
    write_tokenizer(out, cfg["vocab_size"], cfg["max_position_embeddings"])
