"""A checkpoint's safetensors files: which ones, and what their headers say, without reading weights.

`read_header` reads the 8-byte length and the JSON header only, and checks what safetensors checks
on open, so a corrupt, truncated or empty file fails `check-config` as it would fail the load. It
does not map the file: one 140 GB file cannot be mapped where memory overcommit is limited.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pdlaunch.errors import PdlaunchError

MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
INDEX_FILE = "model.safetensors.index.json"
REFETCH_HINT = "re-download or re-save the checkpoint (transformers' save_pretrained writes safetensors)"

# safetensors' header errors, by the text it puts after "Error while deserializing header: ".
_HEADER_ERRORS = {
    "header too small": "is empty or shorter than a safetensors header",
    "header too large": "declares a header larger than safetensors allows: the file is corrupt or not safetensors",
    "incomplete metadata": "is truncated or has bytes past its last tensor: its size does not match its header",
    # valid JSON of the wrong shape (a __metadata__ value that is not a string): matched before "invalid json"
    "invalid json in header: invalid type": "has a header entry of the wrong type",
    "invalid json": "has a header that is not valid JSON: the file is corrupt",
    "invalid header": "has a malformed header: the file is corrupt",
    "invalid offset": "has tensor offsets outside the file: the file is corrupt",
    "invalid utf-8": "has a header that is not UTF-8: the file is corrupt",
}


@dataclass(frozen=True)
class TensorHeader:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, F16, I8, ...
    file: Path
    start: int = 0  # where the tensor's bytes begin in the file
    nbytes: int = 0

    def read(self) -> bytes:
        """The tensor's bytes (for small tensors: check-config reads FP8 scales, never weights)."""
        try:
            with self.file.open("rb") as f:
                f.seek(self.start)
                data = f.read(self.nbytes)
        except OSError as exc:
            raise _bad(self.file, f"cannot be read ({exc.strerror or exc})") from exc
        if len(data) != self.nbytes:
            raise _bad(self.file, _HEADER_ERRORS["incomplete metadata"])
        return data


def unreadable(file: Path, exc: Exception) -> PdlaunchError:
    """The readable form of a safetensors error (never the library's raw text alone). A header entry of the wrong
    type is named by `read_header`'s own check where it finds it (safetensors' text gives only a column)."""
    text = str(exc).removeprefix("Error while deserializing header: ")
    key = next((key for key in _HEADER_ERRORS if text.lower().startswith(key)), None)
    if key == "invalid json in header: invalid type":
        try:
            read_header(file)
        except PdlaunchError as named:
            return named
        return _bad(file, f"{_HEADER_ERRORS[key]} ({text.removeprefix('invalid JSON in header: ')})")
    what = _HEADER_ERRORS[key] if key is not None else f"cannot be read as safetensors ({text})"
    return PdlaunchError(f"{file} {what}", field="model.path", hint=REFETCH_HINT)


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise PdlaunchError(f"cannot read {index}: {exc}", field="model.path", hint=REFETCH_HINT) from exc
    except RecursionError:  # arrays or objects nested past Python's stack
        raise PdlaunchError(f"cannot read {index}: its JSON nests too deeply", field="model.path",
                            hint=REFETCH_HINT) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise PdlaunchError(f"{index} has no weight_map of tensor name -> file name", field="model.path",
                            hint=REFETCH_HINT)
    return weight_map


def index_map(path: Path) -> dict[str, str] | None:
    """Tensor name -> shard file name from model.safetensors.index.json, or None without one."""
    index = path / INDEX_FILE
    return _weight_map(index) if index.is_file() else None


def gguf_hint(directory: Path) -> str | None:
    """How to serve the GGUF file `directory` holds (pdlaunch reads a .gguf file, not the folder it lies in), or
    None when it holds none."""
    try:
        found = sorted(p for p in directory.glob("*.gguf") if p.is_file())
    except OSError:
        return None
    if not found:
        return None
    more = f" (or another of its {len(found)} .gguf files)" if len(found) > 1 else ""
    return f"the directory holds {found[0].name}: pass the .gguf file itself, --model {found[0]}{more}"


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: those named by model.safetensors.index.json, else *.safetensors (without
    a Mistral-format consolidated*.safetensors when other weight files are there)."""
    weight_map = index_map(path)
    if weight_map is not None:
        for name, shard in weight_map.items():
            _inside(path, name, shard)
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.exists() and not file.is_symlink():
                raise PdlaunchError(f"{file} is missing (listed in {INDEX_FILE})", field="model.path",
                                    hint="copy every shard of the checkpoint")
            _regular(file)
        return files
    files = sorted(path.glob("*.safetensors"))
    hf_files = [f for f in files if not f.name.startswith("consolidated")]
    if hf_files:  # Mistral's consolidated copy beside the transformers-format weights: those (as vLLM does)
        files = hf_files
    if not files:
        raise PdlaunchError(
            f"no *.safetensors weights in {path}",
            field="model.path",
            hint=gguf_hint(path) or "pdlaunch loads safetensors only; convert .bin/.pt weights with transformers' "
                                    "save_pretrained",
        )
    for file in files:
        _regular(file)
    return files


def _inside(path: Path, name: str, shard: str) -> None:
    """An index entry's file: a relative path that stays inside the checkpoint directory `path` (vLLM joins it to
    the directory as well). An absolute one, or one climbing out with `..`, had weights read from another
    directory (or any file on the host); an empty one named the directory itself as "missing"."""
    relative = PurePosixPath(shard)
    if relative.parts and not relative.is_absolute() and ".." not in relative.parts:
        return
    raise PdlaunchError(f"{path / INDEX_FILE} lists tensor {name!r} in {shard!r}, which is not a file inside the "
                        "checkpoint directory", field="model.path",
                        hint="each weight_map entry names a shard by its path relative to the checkpoint directory "
                             "(e.g. model-00001-of-00002.safetensors): restore the checkpoint's original index")


def _regular(file: Path) -> None:
    """A weight file that exists and is a regular file (a broken symlink, e.g. an HF cache snapshot whose blob was
    removed, was a FileNotFoundError traceback at load; a directory, safetensors' "No such device" OSError)."""
    if file.is_file():
        return
    if file.is_symlink():
        raise PdlaunchError(f"{file} is a broken symlink (to {os.readlink(file)}, which does not exist)",
                            field="model.path", hint="re-download the checkpoint: a weight file's target is gone")
    raise PdlaunchError(f"{file} is not a regular file", field="model.path",
                        hint="put the checkpoint's weight file there, or (without model.safetensors.index.json, "
                             "where every *.safetensors is loaded) move it out of the directory")


def _bad(file: Path, what: str) -> PdlaunchError:
    return PdlaunchError(f"{file} {what}", field="model.path", hint=REFETCH_HINT)


def _metadata(file: Path, metadata: object) -> None:
    """The header's `__metadata__`: null or a map of strings to strings, as safetensors reads it on open (a number
    there, `{"format": 1}`, is valid JSON that safetensors refuses)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        what = f"__metadata__ {json.dumps(metadata)[:80]} is not a map"
    else:
        wrong = next(((key, value) for key, value in metadata.items() if not isinstance(value, str)), None)
        if wrong is None:
            return
        what = f"__metadata__ entry {wrong[0]!r} is {json.dumps(wrong[1])[:80]}, not a string"
    raise PdlaunchError(f"{file} has a header entry of the wrong type: its {what} (safetensors refuses the file)",
                        field="model.path", hint='re-save it with string __metadata__ values (e.g. {"format": '
                                                 '"pt"}), or re-download the checkpoint')


def _entry(file: Path, name: str, entry: object, header_end: int) -> tuple[TensorHeader, int, int]:
    """One header entry -> (header, data start, data end), with the checks safetensors makes on load."""
    if not isinstance(entry, dict):
        raise _bad(file, f"has a header entry {name!r} that is not a tensor description: the file is corrupt")
    if entry.get("dtype") not in DTYPE_BYTES:
        raise _bad(file, f"has tensor {name!r} with an unknown dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise _bad(file, f"has tensor {name!r} with an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _bad(file, f"has tensor {name!r} with invalid data_offsets {offsets!r}")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[entry["dtype"]]:
        raise _bad(file, f"has tensor {name!r} whose data_offsets do not match its shape {shape}")
    return TensorHeader(name, tuple(shape), entry["dtype"], file, header_end + offsets[0],
                        offsets[1] - offsets[0]), offsets[0], offsets[1]


def read_header(file: Path) -> list[TensorHeader]:
    """Every tensor's name, shape and dtype, reading the header only (a 140 GB file costs one small read).

    Checks what safetensors checks when it opens the file: header size, JSON, offsets that tile the
    data region exactly (a truncated or padded file fails here, as it would fail the load).
    """
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad(file, _HEADER_ERRORS["header too small"])
            header_len = struct.unpack("<Q", prefix)[0]
            if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise _bad(file, _HEADER_ERRORS["header too large"])
            raw = f.read(header_len)
    except OSError as exc:
        raise _bad(file, f"cannot be read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested past Python's stack
        raise _bad(file, _HEADER_ERRORS["invalid json"]) from exc
    if not isinstance(header, dict):
        raise _bad(file, _HEADER_ERRORS["invalid header"])
    _metadata(file, header.get("__metadata__"))
    entries = sorted((_entry(file, name, entry, 8 + header_len) for name, entry in header.items()
                      if name != "__metadata__"),
                     key=lambda item: item[1])
    end = 0
    for tensor, start, stop in entries:
        if start != end:
            raise _bad(file, f"has a gap or overlap before tensor {tensor.name!r}: the file is corrupt")
        end = stop
    if 8 + header_len + end != size:
        raise _bad(file, _HEADER_ERRORS["incomplete metadata"])
    return [tensor for tensor, _, _ in entries]
