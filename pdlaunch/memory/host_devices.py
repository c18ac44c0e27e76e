"""What the launcher, check-config and bench ask of the host's devices before any instance runs.

Nothing here imports torch until a question needs CUDA: a `--device cpu` deployment is validated, planned and
launched without it (importing torch costs the launcher ~2 s of a core before its first instance starts).
The instances ask the same questions through platform.py, which re-exports these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


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


MEMINFO = Path("/proc/meminfo")
PROC_CGROUP = Path("/proc/self/cgroup")  # this process's cgroup, per hierarchy: "4:memory:/a/b", "0::/a/b" (v2)
CGROUP_MOUNT = Path("/sys/fs/cgroup")  # v2: the unified hierarchy; v1: one directory per controller under it
_NO_LIMIT = 1 << 62  # v1 writes "no limit" as 2**63 rounded down to a page; v2 as "max"


@dataclass(frozen=True)
class AvailableMemory:
    """What a process started now may allocate without being killed for memory, bytes, and what bounds it."""

    bytes: int
    source: str  # "MemAvailable of /proc/meminfo", "the cgroup memory limit of 8.00 GiB less 3.10 GiB in use (...)"


def available_memory() -> AvailableMemory | None:
    """The least of MemAvailable (/proc/meminfo: what the kernel can give new processes without swapping, so what
    other processes hold counts, which the RAM would not show) and the room under each memory limit of this
    process's cgroup and its ancestors (a container's or a Kubernetes pod's: past it the cgroup's own
    out-of-memory killer ends the process, however much the host has free). The physical RAM where there is no
    MemAvailable (not Linux); None when nothing can be read."""
    found: list[AvailableMemory] = []
    mem_available = _mem_available()
    if mem_available is not None:
        found.append(AvailableMemory(mem_available, f"MemAvailable of {MEMINFO}"))
    else:
        try:
            found.append(AvailableMemory(host_memory_bytes(), "the physical RAM"))
        except (ValueError, OSError, AttributeError):
            pass
    found += _cgroup_rooms()
    return min(found, key=lambda a: a.bytes) if found else None


def _mem_available() -> int | None:
    try:
        lines = MEMINFO.read_text().splitlines()
    except OSError:
        return None
    for line in lines:  # "MemAvailable:   24147280 kB"
        name, _, value = line.partition(":")
        fields = value.split()
        if name == "MemAvailable" and len(fields) == 2 and fields[0].isdigit() and fields[1] == "kB":
            return int(fields[0]) * 1024
    return None


def _cgroup_rooms() -> list[AvailableMemory]:
    """Limit less usage of each memory cgroup from this process's up to the hierarchy's root (as mounted here: in
    a container, its own cgroup), where a limit is set. Usage without the inactive file cache, which the kernel
    reclaims before it kills (the working set, as the kubelet counts it)."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" and (CGROUP_MOUNT / "cgroup.controllers").is_file():
            return _rooms(CGROUP_MOUNT, path, ("memory.max", "memory.current", "inactive_file"))
        if "memory" in controllers.split(","):
            return _rooms(CGROUP_MOUNT / "memory", path,
                          ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))
    return []


def _rooms(mount: Path, path: str, names: tuple[str, str, str]) -> list[AvailableMemory]:
    limit_file, usage_file, inactive_key = names
    leaf = mount / path.strip("/")
    if not leaf.is_dir():  # the path is the host's, the mount a container's own cgroup: its root is ours
        leaf = mount
    rooms: list[AvailableMemory] = []
    directory = leaf
    while True:
        limit, usage = _read_int(directory / limit_file), _read_int(directory / usage_file)
        if limit is not None and limit < _NO_LIMIT and usage is not None:
            in_use = max(0, usage - _stat(directory / "memory.stat", inactive_key))
            rooms.append(AvailableMemory(max(0, limit - in_use), f"the cgroup memory limit of {limit / 2**30:.2f} "
                                         f"GiB less {in_use / 2**30:.2f} GiB in use ({directory / limit_file})"))
        if directory == mount or mount not in directory.parents:
            return rooms
        directory = directory.parent


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2's "max": no limit


def _stat(path: Path, key: str) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


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
