"""Staging: plain device memory that KV blocks are copied through when NIXL cannot reach the KV cache fast.

Memory from CuMem pools (--enable-cumem-allocator, sleep mode) is not legacy-IPC exportable, so
intra-node UCX falls back to a host-bounce path: 0.5-0.6 GB/s on 2x H200 with NVLink, against
~300 GB/s for plain memory (`bench kv-transfer` with cumem on and off). With staging, NIXL registers
a plain buffer of slots instead (slot s of group g has the shape and size of one block of group g);
blocks are copied into slots before a transfer and out of them after (device copies, ~2 TB/s), in
chunks of at most the smaller side's slot count. The buffer is allocated once, outside any pool,
so sleep/wake never invalidates the NIXL registration.
"""

from __future__ import annotations

import threading

import torch

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.blocks import coalesce

DEFAULT_STAGING_BYTES = 1 << 30  # 8k tokens of a Llama-3-8B-shaped bf16 KV cache; larger loads are chunked


class StagingArea:
    """Slots shaped like one block of `kv_caches`, or with `kv_heads` KV heads instead: a block of a
    prefill rank of another TP size (reshard.py)."""

    def __init__(self, kv_caches: list[torch.Tensor], budget_bytes: int, kv_heads: int | None = None) -> None:
        shapes = [(*t.shape[1:4], kv_heads if kv_heads is not None else t.shape[4], *t.shape[5:]) for t in kv_caches]
        slot_bytes = sum(torch.Size(s).numel() * t.element_size() for s, t in zip(shapes, kv_caches))
        self.num_slots = max(1, min(budget_bytes // slot_bytes, kv_caches[0].shape[0]))
        # buffers[g]: [num_slots, num_layers_g, 2, block_size, num_kv_heads, head_dim], plain allocation.
        self.buffers = [torch.empty((self.num_slots, *s), dtype=t.dtype, device=t.device)
                        for s, t in zip(shapes, kv_caches)]
        self.device = kv_caches[0].device
        self._free: set[int] = set(range(self.num_slots))
        self._cond = threading.Condition()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def acquire(self, n: int, timeout: float) -> list[int]:
        """n slots (a consecutive run when one is free, for one descriptor); waits up to `timeout` s."""
        if n > self.num_slots:
            raise KVTransferError(f"a staging chunk of {n} blocks exceeds the {self.num_slots} staging slots")
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._free) >= n, timeout):
                raise KVTransferError(
                    f"no {n} free KV staging slots within {timeout:g}s ({len(self._free)} of {self.num_slots} free)",
                    field="kv_transfer.transfer_timeout_seconds",
                    hint="too many concurrent transfers for the staging buffer; they are retried by the client",
                )
            free = sorted(self._free)
            start = next((i for i in range(len(free) - n + 1) if free[i + n - 1] - free[i] == n - 1), None)
            slots = free[start:start + n] if start is not None else free[:n]
            self._free -= set(slots)
            return slots

    def release(self, slots: list[int]) -> None:
        with self._cond:
            self._free |= set(slots)
            self._cond.notify_all()

    def num_free(self) -> int:
        with self._cond:
            return len(self._free)

    def gather(self, kv_caches: list[torch.Tensor], blocks: list[list[int]], slots: list[int]) -> None:
        """buffers[g][slots[i]] = kv_caches[g][blocks[g][i]], finished before returning."""
        for g, ids in enumerate(blocks):
            # One slice copy per run of consecutive ids on both sides (plain memcpy speed).
            for run in coalesce(list(zip(slots[:len(ids)], ids))):
                self.buffers[g][run.local_start:run.local_start + run.count].copy_(
                    kv_caches[g][run.remote_start:run.remote_start + run.count])
        self._sync()

    def scatter(self, kv_caches: list[torch.Tensor], blocks: list[list[int]], slots: list[int]) -> None:
        """kv_caches[g][blocks[g][i]] = buffers[g][slots[i]], finished before returning."""
        for g, ids in enumerate(blocks):
            for run in coalesce(list(zip(ids, slots[:len(ids)]))):
                kv_caches[g][run.local_start:run.local_start + run.count].copy_(
                    self.buffers[g][run.remote_start:run.remote_start + run.count])
        self._sync()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
