"""A digest of a checkpoint's weights that tells two checkpoints of one architecture apart (a base model and its
fine-tune, two fine-tunes of an A/B test) without hashing gigabytes at every start.

KV stored by one checkpoint is wrong for another that shares its config: the storage connector keys its files by
this digest too (kv_transfer/storage_connector.py), so two deployments sharing `kv_transfer.storage_path` (its
default is one directory per user) never load each other's KV unless their weights are the same.

Per tensor: its name, dtype and shape, all of its bytes up to WHOLE_BYTES (norms, biases: a fine-tune of those
alone changes them), and WINDOWS spread windows of a larger one (a fine-tune changes every element of a tensor it
trains). About 4 KiB read per large tensor: milliseconds for the files the instance has just loaded; a
DeepSeek-V3-sized MoE (89k tensors in 163 files, 44.5k of them sampled) takes 1.3-2 s on a 2-core CI machine,
from the page cache (benchmarks/weights_digest_speed.py). The same weights saved in another directory give the same
digest; files rewritten in place give a new one. Nothing is kept between calls: the digest of the weights a model
holds is the one computed when they were loaded, which the caller keeps (the storage connector, until a level-2
wake-up reloads them from the directory, which may hold new ones).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.weight_files import REFETCH_HINT, TensorHeader, read_header, safetensors_files

WHOLE_BYTES = 64 << 10
WINDOWS = 16
WINDOW_BYTES = 256


def _windows(tensor: TensorHeader) -> list[tuple[int, int]]:
    """(file offset, bytes) of what is hashed of `tensor`: all of it when small, else WINDOWS spread windows."""
    if tensor.nbytes <= WHOLE_BYTES:
        return [(tensor.start, tensor.nbytes)]
    step = (tensor.nbytes - WINDOW_BYTES) // (WINDOWS - 1)
    return [(tensor.start + i * step, WINDOW_BYTES) for i in range(WINDOWS)]


def weights_digest(checkpoint: Path) -> str:
    """16 hex digits over the weights of the checkpoint directory (module doc). Raises PdlaunchError naming
    model.path for a file that cannot be read, as the loader would."""
    digest = hashlib.sha256()
    for file in safetensors_files(checkpoint):
        tensors = sorted(read_header(file), key=lambda t: t.start)
        digest.update(f"{file.name}\0".encode())
        try:
            fd = os.open(file, os.O_RDONLY)
            try:  # one pread a window: a buffered file read 8 KiB around each 256-byte window (twice the time)
                for tensor in tensors:
                    digest.update(f"{tensor.name}\0{tensor.dtype}\0{tensor.shape}\0".encode())
                    for offset, size in _windows(tensor):
                        digest.update(os.pread(fd, size, offset))
            finally:
                os.close(fd)
        except OSError as exc:
            raise PdlaunchError(f"{file} cannot be read ({exc.strerror or exc})", field="model.path",
                                hint=REFETCH_HINT) from exc
    return digest.hexdigest()[:16]
