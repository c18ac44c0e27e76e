"""What the launcher, check-config and bench ask of the host's devices before any instance runs.

Nothing here imports torch until a question needs CUDA: a `--device cpu` deployment is validated, planned and
launched without it (importing torch costs the launcher ~2 s of a core before its first instance starts).
The instances ask the same questions through platform.py, which re-exports these.
"""

from __future__ import annotations

import os
from functools import lru_cache


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def device_count() -> int:
    """Visible CUDA devices (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if cuda_available() else 0


def child_visible_devices(indices: list[int], env: dict[str, str] | None = None) -> str:
    """CUDA_VISIBLE_DEVICES for a child process that is to see the devices `indices` of this process's own
    numbering (0..device_count()-1). When this process runs under a CUDA_VISIBLE_DEVICES of its own (a shared
    host: `CUDA_VISIBLE_DEVICES=2,3 pdlaunch serve`), its index i is that list's i-th entry (a number, a GPU-
    UUID or a MIG name), not physical GPU i: a child told "0" would run on the host's GPU 0, beside whatever
    runs there."""
    parent = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if parent is None:
        return ",".join(str(i) for i in indices)
    entries = [e.strip() for e in parent.split(",")]
    # CUDA counts the entries up to the first it cannot use, so every index device_count() gives is in range
    return ",".join(entries[i] for i in indices)


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when a CUDA device is visible, else `cpu`."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    return device


def device_total_bytes(index: int = 0) -> int:
    """Total bytes of a CUDA device, read without creating a CUDA context on it."""
    import torch

    return int(torch.cuda.get_device_properties(index).total_memory)


@lru_cache(maxsize=1)
def is_cumem_allocator_available() -> bool:
    """True when the CuMem (cuMemCreate/cuMemMap) allocator can run here: CUDA and the driver API."""
    import torch

    if not cuda_available() or torch.version.cuda is None:
        return False
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def is_sleep_mode_available() -> bool:
    """Sleep mode backs weights up and discards KV through the CuMem pools, so it needs the same support."""
    return is_cumem_allocator_available()


def host_memory_bytes() -> int:
    """Physical RAM of this host, bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# Where torch reads its allocator settings from. Which one wins when several are set changed between versions (torch
# 2.13 reads only the first set of these, in this order, even an empty one; earlier sources read PYTORCH_ALLOC_CONF
# first), and the GPU hosts' torch need not be the launcher's: any of them turning expandable_segments on counts.
ALLOC_CONF_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def expandable_segments_variable() -> str | None:
    """The variable whose allocator settings turn on expandable_segments (it breaks RDMA registration, vLLM
    #33540), None when none of torch's allocator variables does (ALLOC_CONF_VARIABLES: whichever torch reads)."""
    for name in ALLOC_CONF_VARIABLES:
        conf = os.environ.get(name, "")
        if any(part.strip().replace(" ", "") == "expandable_segments:True" for part in conf.split(",")):
            return name
    return None


def expandable_segments_enabled() -> bool:
    """True when the allocator settings torch reads turn on expandable_segments (expandable_segments_variable)."""
    return expandable_segments_variable() is not None
