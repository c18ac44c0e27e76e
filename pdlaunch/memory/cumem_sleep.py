"""Sleep and wake of the CuMem allocator (memory/cumem.py): release every allocation's physical memory,
the offloaded tags first copied to pinned host memory, and map it again at the same virtual addresses,
their backups restored; a restore that fails leaves its pool asleep with its backup kept.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import torch

from pdlaunch.memory.cumem_driver import FIELD, Allocation, CuMemDriver, CuMemError
from pdlaunch.memory.platform import cuda_stream

logger = logging.getLogger("pdlaunch.memory.cumem")  # the allocator's one logger name, across its files


class CuMemSleep(CuMemDriver):
    """`sleep` and `wake_up` of `CuMemAllocator` (its base)."""

    # The allocator's parts these methods read; CuMemAllocator.__init__ builds them.
    _lock: threading.RLock
    _allocations: dict[int, Allocation]
    _copy_streams: dict[int, torch.cuda.Stream]

    def sleep(self, offload_tags: Sequence[str] = ("weights",)) -> int:
        """Release the physical memory of every allocation, first copying `offload_tags` to pinned CPU
        memory. Virtual ranges stay reserved. Already released allocations are left alone (safe to
        repeat). Returns the bytes released."""
        offload = set(offload_tags)
        with self._lock:
            awake = [a for a in self._allocations.values() if a.handle is not None]
            for device in sorted({a.device for a in awake}):
                torch.cuda.synchronize(device)  # no kernel may still touch memory that is about to go
            try:
                for alloc in awake:
                    if alloc.tag in offload:
                        alloc.backup = torch.empty(alloc.size, dtype=torch.uint8, pin_memory=True)
                        self._check(self._cu.cuMemcpyDtoHAsync(alloc.backup.data_ptr(), alloc.ptr, alloc.size,
                                                               self._copy_stream(alloc.device).cuda_stream),
                                    "cuMemcpyDtoHAsync (backup)")
                self._sync_copies({a.device for a in awake})
            except BaseException:  # nothing was released: stay fully awake, drop partial backups
                for alloc in awake:
                    alloc.backup = None
                raise
            try:
                for alloc in awake:
                    self._unmap(alloc)
            except BaseException:
                # those still mapped hold their contents on the GPU: their pinned backups would only sit there
                # (GiBs) until the next sleep; those unmapped before the failure are asleep, their backups kept
                for alloc in awake:
                    if alloc.handle is not None:
                        alloc.backup = None
                raise
            freed = sum(a.size for a in awake)
        logger.info("cumem: slept, released %.2f GiB (%s backed up)", freed / 2**30, sorted(offload) or "nothing")
        return freed

    def wake_up(self, tags: Sequence[str] | None = None) -> int:
        """Map physical memory again for the released allocations of `tags` (all when None) at their old
        addresses, restoring backed-up contents; others come back uninitialised. Awake ones are left
        alone (safe to repeat); after a failure (e.g. out of memory) a retry resumes: an allocation whose
        restore failed is asleep again with its backup kept. Returns bytes mapped."""
        with self._lock:
            asleep = [a for a in self._allocations.values()
                      if a.handle is None and (tags is None or a.tag in tags)]
            woken: list[Allocation] = []
            try:
                for alloc in asleep:
                    self._wake(alloc)
                    woken.append(alloc)
            finally:
                self._finish_restores(woken)
            mapped = sum(a.size for a in woken)
        logger.info("cumem: woke %s, mapped %.2f GiB", sorted(tags) if tags else "all", mapped / 2**30)
        return mapped

    def _wake(self, alloc: Allocation) -> None:
        """Map `alloc` and queue the copy of its backup (if any) on the copy stream."""
        alloc.handle = self._map(alloc.ptr, alloc.size, alloc.device)
        if alloc.backup is None:
            return
        try:
            self._check(self._cu.cuMemcpyHtoDAsync(alloc.ptr, alloc.backup.data_ptr(), alloc.size,
                                                   self._copy_stream(alloc.device).cuda_stream),
                        "cuMemcpyHtoDAsync (restore)")
        except CuMemError as exc:
            self._back_to_sleep(alloc)
            raise self._restore_failed([alloc], exc) from exc

    def _finish_restores(self, woken: list[Allocation]) -> None:
        """Wait for the restore copies of `woken`; a backup is dropped only once its copy landed."""
        restoring = [a for a in woken if a.backup is not None]
        try:
            self._sync_copies({a.device for a in woken})
        except Exception as exc:  # the copies' outcome is unknown: restore them all again on the next wake_up
            if not restoring:
                raise
            for alloc in restoring:
                self._back_to_sleep(alloc)
            raise self._restore_failed(restoring, exc) from exc
        for alloc in restoring:
            alloc.backup = None

    def _back_to_sleep(self, alloc: Allocation) -> None:
        """Unmap `alloc` whose restore did not land, keeping its backup: it is asleep again."""
        try:
            self._unmap(alloc)
        except CuMemError:
            logger.exception("cumem: %d bytes of pool %r at %#x whose restore failed stay mapped, without their "
                             "contents", alloc.size, alloc.tag, alloc.ptr)

    @staticmethod
    def _restore_failed(allocs: list[Allocation], exc: Exception) -> CuMemError:
        tags = sorted({a.tag for a in allocs})
        why = exc.message if isinstance(exc, CuMemError) else f"{type(exc).__name__}: {exc}"
        return CuMemError(f"restoring {sum(a.size for a in allocs)} bytes of memory pool(s) {tags} from their host "
                          f"backup failed: {why}", field=FIELD,
                          hint="the backup is kept and the pool stays asleep: call wake_up again; if the CUDA "
                               "error persists, restart the instance")

    def _copy_stream(self, device: int) -> torch.cuda.Stream:
        if device not in self._copy_streams:
            self._copy_streams[device] = cuda_stream(device)
        return self._copy_streams[device]

    def _sync_copies(self, devices: set[int]) -> None:
        for device in devices:
            self._copy_stream(device).synchronize()
