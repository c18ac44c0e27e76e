"""What a prefill engine tells a decode engine about its KV cache, and the compatibility check.

The decode side asks the prefill side channel once per remote engine (cached) and refuses to move
bytes between caches whose blocks do not mean the same thing.
"""

from __future__ import annotations

import hashlib
import json
import socket
from functools import lru_cache

import torch
from pydantic import BaseModel

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec

KV_LAYOUT = "block_major[num_blocks,num_layers,2,block_size,num_kv_heads,head_dim]"

# Handshake field -> (config key it comes from, how to make the two instances agree).
_COMPAT_FIELDS: dict[str, tuple[str, str]] = {
    "kv_layout": ("kv_layout", "run the same pdlaunch version on both instances"),
    "model_name": ("model.path", "serve the same checkpoint (--model) on prefill and decode"),
    "dtype": ("model.dtype", "use the same --dtype on prefill and decode"),
    "kv_cache_dtype": ("cache.kv_cache_dtype", "use the same --kv-cache-dtype on prefill and decode"),
    "kv_scales": ("model.path", "serve the same checkpoint (its k_scale/v_scale tensors) on prefill and decode"),
    "block_size": ("cache.block_size", "use the same --block-size on prefill and decode"),
    "num_kv_heads": ("parallel.tp", "serve the same model with the same TP size on prefill and decode"),
    "head_dim": ("model.path", "serve the same checkpoint (--model) on prefill and decode"),
    "group_layers": ("model.path", "serve the same checkpoint (--model) on prefill and decode"),
    "tp_size": ("parallel.tp", "use the same TP size on prefill and decode (--prefill-tp / --decode-tp)"),
}


class DeviceInfo(BaseModel):
    """Where an engine's KV cache lives, for choosing pull or push."""

    type: str  # "cpu" | "cuda"
    index: int = 0  # CUDA device index in the owning process (0 on CPU)
    pci_bus_id: str = ""  # physical identity of the GPU (CUDA_VISIBLE_DEVICES may renumber)
    host_id: str = ""  # hostname + boot id: same value = same machine


class HandshakeInfo(BaseModel):
    """The prefill side's answer to {"type": "handshake"} (one TP rank)."""

    engine_id: str
    agent_name: str
    agent_metadata: str  # hex of nixl_agent.get_agent_metadata()
    base_addrs: list[int]  # per group: data_ptr of the KV cache tensor
    block_bytes: list[int]  # per group
    num_blocks: int
    block_size: int
    dtype: str
    kv_layout: str
    num_kv_heads: int
    head_dim: int
    group_layers: list[list[int]]
    model_name: str
    tp_size: int
    tp_rank: int
    device: DeviceInfo
    compat_hash: str
    staging_slots: int = 0  # > 0: base_addrs are a staging buffer of this many slots (staging.py)
    kv_cache_dtype: str = ""  # the cache tensors' dtype, e.g. float8_e4m3fn
    kv_scales: str = ""  # digest of the per-layer FP8 KV scales ("" unless the cache is fp8)


def compat_fields(spec: KVCacheSpec) -> dict[str, object]:
    return {
        "kv_layout": KV_LAYOUT,
        "model_name": spec.model_name,
        "dtype": str(spec.dtype).removeprefix("torch."),
        "kv_cache_dtype": str(spec.kv_cache_dtype or spec.dtype).removeprefix("torch."),
        "kv_scales": spec.kv_scales,
        "block_size": spec.block_size,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "group_layers": spec.group_layers,
        "tp_size": spec.tp_size,
    }


def compat_hash(fields: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def device_info(device: torch.device) -> DeviceInfo:
    if device.type != "cuda":
        return DeviceInfo(type=device.type, host_id=host_id())
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    # torch's stubs omit the PCI fields that _CudaDeviceProperties has at run time (torch >= 2.1).
    domain, bus_id, dev = (int(getattr(props, f"pci_{name}_id")) for name in ("domain", "bus", "device"))
    bus = f"{domain:08x}:{bus_id:02x}:{dev:02x}.0"
    return DeviceInfo(type="cuda", index=index, pci_bus_id=bus, host_id=host_id())


_RESHARDED_FIELDS = ("tp_size", "num_kv_heads")  # may differ when the decode side reshards (reshard.py)


def check_compatible(local: KVCacheSpec, remote: HandshakeInfo, remote_role: str = "prefill",
                     reshard: bool = False) -> None:
    """Raise KVTransferError naming the first field that differs, both values, and the fix.

    reshard=True: the TP split may differ (the caller maps heads); everything else must match."""
    mine = compat_fields(local)
    if not reshard and compat_hash(mine) == remote.compat_hash:
        return
    theirs = {name: getattr(remote, name) for name in mine}
    theirs["kv_cache_dtype"] = remote.kv_cache_dtype or remote.dtype  # "" = the model dtype
    for name, (config_key, hint) in _COMPAT_FIELDS.items():
        if reshard and name in _RESHARDED_FIELDS:
            continue
        if mine[name] != theirs[name]:
            raise KVTransferError(
                f"KV caches are incompatible: {name} differs ({remote_role} engine {remote.engine_id}: "
                f"{theirs[name]!r}, this engine: {mine[name]!r})",
                field=config_key,
                hint=hint,
            )
    if reshard:
        return
    raise KVTransferError(
        f"KV caches are incompatible: compatibility hash differs ({remote_role} engine {remote.engine_id}: "
        f"{remote.compat_hash}, this engine: {compat_hash(mine)}) although every field matches",
        hint="run the same pdlaunch version on both instances",
    )


def check_layout(local: KVCacheSpec, remote: HandshakeInfo, where: str, reshard: bool = False) -> None:
    """Raise KVTransferError unless the handshake of `where` (the peer's engine and address) gives what a
    load indexes and strides by: one base address and block size per KV-cache group of this engine, the
    size of this engine's blocks (resharding: of a block of the peer's KV heads), and counts of blocks
    and staging slots that bound the ids a READ names."""
    groups = len(local.kv_caches)
    expected = local.block_bytes
    if reshard:  # a block is [layers, 2, block_size, heads, head_dim]: its size is linear in the heads
        expected = [b // local.num_kv_heads * remote.num_kv_heads for b in local.block_bytes]
    problems = []
    if len(remote.base_addrs) != groups:
        problems.append(f"base_addrs names {len(remote.base_addrs)} KV-cache groups, this engine has {groups}")
    if remote.block_bytes != expected:
        problems.append(f"block_bytes is {remote.block_bytes}, expected {expected}")
    if remote.num_blocks < 1:
        problems.append(f"num_blocks is {remote.num_blocks}, expected at least 1")
    if remote.staging_slots < 0:
        problems.append(f"staging_slots is {remote.staging_slots}, expected 0 (no staging) or more")
    if problems:
        raise KVTransferError(f"the KV handshake of {where} does not fit this engine: {'; '.join(problems)}",
                              hint="run the same pdlaunch version on prefill and decode")
