"""Host regions of the CPU tier, page-locked at exactly their size on CUDA hosts.

Why not `torch.zeros(..., pin_memory=True)`: torch's caching host allocator rounds every pinned
allocation up to the next power of two (ATen CachingHostAllocator, pytorch#150517), so a 40 GiB tier
would lock 64 GiB of RAM: past `--kv-offload-gb` and past what check-config counted. Instead the
region is allocated as ordinary host memory and registered with the driver (cudaHostRegister, what
`torch.cuda._pin_memory_utils` does), which locks exactly its bytes; copies from it are then
asynchronous DMA as from any pinned tensor. `unpin` unregisters it once no copy can touch it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdlaunch.errors import EngineError

_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, as torch's own helper does


def host_register(data_ptr: int, num_bytes: int) -> int:
    """cudaHostRegister; the CUDA error code (0: success)."""
    return int(torch.cuda.cudart().cudaHostRegister(data_ptr, num_bytes, _PORTABLE))  # type: ignore[no-untyped-call]


def host_unregister(data_ptr: int) -> int:
    """cudaHostUnregister; the CUDA error code (0: success)."""
    return int(torch.cuda.cudart().cudaHostUnregister(data_ptr))  # type: ignore[no-untyped-call]


def zeroed_region(num_blocks: int, block_shape: Sequence[int], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A zeroed `[num_blocks, *block_shape]` host tensor, page-locked (exactly its bytes) when `pin`.
    RuntimeError when the memory cannot be had or locked (the caller names the flag)."""
    region = torch.zeros(num_blocks, *block_shape, dtype=dtype)
    if pin and region.nbytes > 0:
        code = host_register(region.data_ptr(), region.nbytes)
        if code != 0:
            raise RuntimeError(f"cudaHostRegister of {region.nbytes} bytes failed with CUDA error {code}")
    return region


def unpin(regions: Sequence[torch.Tensor]) -> None:
    """Unregister regions `zeroed_region(pin=True)` made; no copy may still use them."""
    failed = [code for r in regions if r.nbytes > 0 and (code := host_unregister(r.data_ptr())) != 0]
    if failed:
        raise EngineError(f"cudaHostUnregister of the CPU offload tier failed with CUDA error(s) {failed}",
                          field="cache.kv_offload_gb", hint="see the log; the process should be restarted")
