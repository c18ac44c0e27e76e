"""The runner's KV cache tensors: how many blocks, their allocation, and the error when they do not fit.

One tensor per KV-cache group in the block-major layout of model/attention_metadata.py,
[num_blocks, layers_in_group, 2, block_size, kv_heads, head_dim], so one block of every layer of a group is
one contiguous byte range and runs of blocks coalesce into MiB-sized transfer descriptors. Block count:
`cache.num_gpu_blocks` if set; on CUDA what is left of `gpu_memory_utilization * total` after the weights and
the activations of a profiled `max_num_batched_tokens` step (`SchedulerConfig.token_budget`); on CPU
`cache.cpu_kv_cache_gb`.
"""

from __future__ import annotations

import logging
import math
import mmap

import torch

from pdlaunch.config.engine_config import CacheConfig
from pdlaunch.errors import EngineError
from pdlaunch.memory.cumem import memory_pool_context
from pdlaunch.memory.platform import device_memory_bytes
from pdlaunch.model.quant.kv_cache import scales_digest
from pdlaunch.runner.dry_steps import DrySteps
from pdlaunch.runner.out_of_memory import first_line, free_text, host_out_of_memory, out_of_memory

log = logging.getLogger(__name__)


NON_TORCH_CAP_BYTES = 2 * 2**30


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, resizable: bool = False) -> torch.Tensor:
    """A zeroed cache tensor. On the CPU, fresh anonymous memory: the kernel gives each page, zeroed, when it is
    first touched, so a GiB-sized cache costs nothing at start and takes RAM as blocks are written (torch.zeros
    wrote every byte: ~1 s a GiB, several seconds an instance on a busy host). A host that refuses the mapping
    (overcommit limit, ulimit -v) raises OSError ENOMEM here, as torch's allocator refused it before. `resizable`
    (sleep mode without cumem: memory/sleep.py's TensorSleepBackend frees a tensor by resizing its storage, which
    a mapping's cannot be): torch.zeros there too."""
    if device.type != "cpu" or resizable:
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    # the tensor holds the mapping (frombuffer keeps a reference); it is unmapped with the last view of it
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).view(shape)


class KVCacheTensors(DrySteps):
    """ModelRunner's KV cache (a part of it: ModelRunner.__init__ sets the attributes below); the memory
    profile that sizes it is a dry step."""

    dtype: torch.dtype
    cache_config: CacheConfig
    use_cumem: bool
    sleep_mode: bool
    num_blocks: int

    @property
    def block_bytes(self) -> int:
        """Bytes of one block id across every group (each group has its own tensor)."""
        elem = torch.tensor([], dtype=self.kv_dtype).element_size()
        per_layer = 2 * self.block_size * self.num_kv_heads * self.head_dim * elem
        return per_layer * sum(len(g.layers) for g in self.groups)

    def allocate_kv_caches(self) -> None:
        """(Re)create the zeroed cache tensors, e.g. after a sleep discarded them."""
        try:
            with memory_pool_context(self.use_cumem, "kv_cache"):
                self.kv_caches = [
                    zeros((self.num_blocks, len(g.layers), 2, self.block_size, self.num_kv_heads, self.head_dim),
                          self.kv_dtype, self.device, resizable=self.sleep_mode)
                    for g in self.groups
                ]
        except (RuntimeError, OSError) as exc:
            if not (out_of_memory(exc) or host_out_of_memory(exc)):
                raise
            self.kv_caches = []
            raise self._kv_cache_oom(exc) from None

    def _kv_cache_oom(self, exc: RuntimeError | OSError) -> EngineError:
        """The error for a KV cache that did not fit, naming the setting that sized it: on a GPU usually other
        processes (another instance's KV cache allocated after this one's profile, or anything else on the GPU)
        hold memory the budget counted on; on the CPU the host refused the allocation (its overcommit limit, a
        ulimit -v)."""
        needed = self.num_blocks * self.block_bytes
        cuda = self.device.type == "cuda"
        where = f"GPU memory{free_text(self.device)}" if cuda else "host memory"
        if self.cache_config.num_gpu_blocks is not None:
            field = "cache.num_gpu_blocks"
            hint = (f"lower it: each block takes {self.block_bytes / 2**20:.2f} MiB, and they must fit beside what "
                    f"other processes hold ({'nvidia-smi' if cuda else '`free -g`'} shows it)")
        elif cuda:
            field = "cache.gpu_memory_utilization"
            hint = ("lower it; instances sharing a GPU each take their fraction of the whole GPU, so theirs must add "
                    "up to less than 1 with room for what other processes hold (nvidia-smi lists them)")
        else:
            field = "cache.cpu_kv_cache_gb"
            hint = "lower it to what the host can give each instance (`free -g` shows the memory in use)"
        return EngineError(f"the KV cache ({self.num_blocks} blocks, {needed / 2**30:.2f} GiB) did not fit in "
                           f"{where}: {first_line(exc)}", field=field, hint=hint)

    def kv_scales_digest(self) -> str:
        """Digest of the per-layer FP8 KV scales ("" when the cache is not fp8): P and D must agree."""
        return scales_digest(self.model.kv_scales()) if self.kv_dtype != self.dtype else ""

    def _determine_num_blocks(self, free_at_start: int) -> int:
        if self.cache_config.num_gpu_blocks is not None:
            return self.cache_config.num_gpu_blocks
        if self.device.type == "cuda":
            kv_bytes = self._profile_cuda_kv_bytes(free_at_start)
            field = "cache.gpu_memory_utilization"
        else:
            kv_bytes = int(self.cache_config.cpu_kv_cache_gb * 2**30)
            field = "cache.cpu_kv_cache_gb"
        num_blocks = kv_bytes // self.block_bytes
        if num_blocks <= 0:
            raise EngineError(
                f"no memory is left for the KV cache ({kv_bytes / 2**20:.0f} MiB budget, "
                f"{self.block_bytes / 2**20:.2f} MiB per block)",
                field=field,
                hint="raise it, lower scheduler.max_num_batched_tokens, or set cache.num_gpu_blocks",
            )
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.block_size,
                 num_blocks * self.block_bytes / 2**30)
        return num_blocks

    @torch.inference_mode()
    def _profile_cuda_kv_bytes(self, free_at_start: int) -> int:
        """Run the largest step once without a cache and measure what it needs."""
        index = self.device.index or 0
        _, total = device_memory_bytes(index)
        requested = int(self.cache_config.gpu_memory_utilization * total)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = self.scheduler_config.token_budget(self.role)
        lens = self._prompt_lens(num_tokens)
        self._dry_step(lens, [0] * len(lens), [], logit_rows=min(self.scheduler_config.max_num_seqs, num_tokens))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free_now, _ = device_memory_bytes(index)
        # Memory this process took outside torch's allocator (CUDA context, cuBLAS workspaces). When
        # instances share a GPU, the free-memory delta also holds what the others allocated in the
        # meantime (an 8B instance loads 16 GiB), so cap it at what one process's context can take.
        measured = max(0, (free_at_start - free_now) - torch.cuda.memory_reserved(self.device))
        non_torch = min(measured, NON_TORCH_CAP_BYTES)
        torch.cuda.empty_cache()
        kv_bytes = requested - peak - non_torch
        log.info("memory profile: %.2f GiB requested, %.2f GiB peak torch, %.2f GiB other -> %.2f GiB KV",
                 requested / 2**30, peak / 2**30, non_torch / 2**30, kv_bytes / 2**30)
        return kv_bytes
