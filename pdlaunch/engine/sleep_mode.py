"""Sleep mode of an engine (docs/ARCHITECTURE.md "CuMem and sleep"): weights and KV cache give back their memory.

The memory work is the MemorySleep's (pdlaunch/memory/sleep.py): on CUDA with the cumem
allocator the pools keep their virtual addresses; otherwise (CPU, tests) the tensors' storages are
freed and re-allocated. What the engine adds: sleep only when idle, forget the prefix cache (the
KV is discarded), let the connector drop its own device memory (a staging buffer), zero the KV cache
after it wakes, re-register it with the connector (its physical pages, and without cumem its
addresses, are new), reload the weights after a level-2 sleep, emptying the CPU offload tier first (its KV
was computed by the weights before the sleep; a level-1 wake restores those same weights and keeps it), and set
vllm:engine_sleep_state after each sleep and wake-up.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import TYPE_CHECKING, Protocol

import torch

from pdlaunch.errors import EngineError
from pdlaunch.memory.sleep import MemorySleep, SleepBackend, SleepResult, TensorSleepBackend, WakeResult
from pdlaunch.metrics.vllm_series import set_sleep_state
from pdlaunch.model.loader import load_model
from pdlaunch.model.quant.fp8 import FP8_DTYPE

if TYPE_CHECKING:
    from pdlaunch.engine.allocator_watch import AllocatorWatch
    from pdlaunch.engine.outputs import RequestOutput
    from pdlaunch.engine.scheduler import Scheduler
    from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnector
    from pdlaunch.kvcache.block_manager import BlockManager
    from pdlaunch.model.checkpoint import Checkpoint
    from pdlaunch.offload.manager import OffloadManager
    from pdlaunch.runner.model_runner import ModelRunner

log = logging.getLogger(__name__)
HOLD_DRAIN_S = 5.0  # how long /sleep waits for finished requests' KV holds to be released
HOLD_POLL_S = 0.005


class SleepableEngine(Protocol):
    """What sleep needs of an engine (LLMEngine is one); a protocol, so that this module sits below
    llm_engine.py instead of importing it back."""

    runner: ModelRunner
    scheduler: Scheduler
    block_manager: BlockManager
    connector: KVConnector | None
    offload: OffloadManager | None
    checkpoint: Checkpoint
    allocator: AllocatorWatch | None

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...

    def kv_cache_spec(self) -> KVCacheSpec: ...


class EngineSleep:
    def __init__(self, engine: SleepableEngine) -> None:
        self.engine = engine
        self._reloaded = False  # this wake-up reloaded the weights (level 2): the connector is told in _after_wake
        self.backend = self._backend()
        self.controller = MemorySleep(self.backend, reload_weights=self._reload_weights)
        self.controller.add_before_sleep_hook(self._before_sleep)
        self.controller.add_after_wake_hook(self._after_wake)

    def _backend(self) -> SleepBackend:
        runner = self.engine.runner
        if runner.use_cumem:
            from pdlaunch.memory.cumem import CuMemAllocator

            return CuMemAllocator.get_instance()
        backend = TensorSleepBackend()
        backend.register("weights", list(runner.model.parameters()) + list(runner.model.buffers()))
        backend.register("kv_cache", runner.kv_caches)
        return backend

    def sleep(self, level: int) -> SleepResult:
        try:
            result = self.controller.sleep(level)
        finally:  # a sleep that failed may have left the memory asleep (MemorySleep._undo_sleep)
            set_sleep_state(self.controller.level)
            self._rebase_allocator_watch()
        if self.engine.runner.device.type == "cuda":
            # What stays on the device while asleep: the CUDA context, the CUDA graphs' pool, NIXL/UCX.
            free, total = torch.cuda.mem_get_info(self.engine.runner.device)
            log.info("asleep: torch holds %.0f MiB reserved (%.0f MiB allocated); device %.0f MiB in use",
                     torch.cuda.memory_reserved(self.engine.runner.device) / 2**20,
                     torch.cuda.memory_allocated(self.engine.runner.device) / 2**20, (total - free) / 2**20)
        return result

    def wake_up(self, tags: list[str] | None = None) -> WakeResult:
        try:
            return self.controller.wake_up(tags)
        finally:  # a wake-up that failed may have woken some of the memory
            set_sleep_state(self.controller.level)
            self._rebase_allocator_watch()

    def _rebase_allocator_watch(self) -> None:
        """What sleeping and waking freed and allocated was meant: not the memory shortage the watch reports."""
        if self.engine.allocator is not None:
            self.engine.allocator.rebase()

    def is_sleeping(self) -> bool:
        return self.controller.is_sleeping()

    def _before_sleep(self, level: int) -> None:
        engine = self.engine
        waited = self._drain_holds()
        s = engine.scheduler
        if engine.has_unfinished_requests() or s.held or s.draining:
            text = f"{len(s.requests)} request(s) running"
            holds = f"{len(s.held)} KV hold(s) waiting for a decode instance"
            if s.draining:  # their transfer may still write their blocks: the KV memory must outlive it
                text += f", {holds} and {len(s.draining)} ended KV load(s) whose transfer may still write their blocks"
            else:
                text += f" and {holds}"
            # "after": only when the holds outlived the drain window; running requests are refused at once
            raise EngineError(f"{text} (after {HOLD_DRAIN_S:g}s)" if waited else text, field="sleep",
                              hint="sleep when the instance is idle")
        engine.block_manager.reset_prefix_cache()
        if engine.connector is not None:  # last: a connector that refuses leaves everything in place
            engine.connector.before_sleep()

    def _drain_holds(self) -> bool:
        """A prefill with no request running may still hold the KV of one that just finished: its decode
        has the blocks (the client may already have its answer) but the prefill learns so on a later
        step. A decode may still keep the blocks of a load it aborted (`draining`) until its connector
        says no transfer writes them any more. Step for up to HOLD_DRAIN_S while only such holds are
        left, so a /sleep sent right after the last answer or abort does not fail; one that outlives it
        (a decode that never reads, a transfer that runs on) is refused. True when it waited for holds."""
        engine = self.engine
        s = engine.scheduler
        deadline = time.monotonic() + HOLD_DRAIN_S
        waited = False
        while (s.held or s.draining) and not engine.has_unfinished_requests() and time.monotonic() < deadline:
            waited = True
            engine.step()  # polls the connector and the leases; no request runs, so it produces no output
            time.sleep(HOLD_POLL_S)
        return waited

    def _after_wake(self, tags: tuple[str, ...]) -> None:
        engine = self.engine
        if "kv_cache" in tags:
            with torch.no_grad():
                for cache in engine.runner.kv_caches:
                    cache.zero_()
            if engine.connector is not None:
                engine.connector.register_kv_caches(engine.kv_cache_spec())
        elif self._reloaded and engine.connector is not None and "kv_cache" not in self.backend.asleep_tags():
            # the KV cache was woken (and registered, under the old weights) in an earlier call; one woken later is
            # registered then, with the new weights
            engine.connector.weights_reloaded(engine.kv_cache_spec())
        self._reloaded = False

    def _reload_weights(self) -> None:
        runner = self.engine.runner
        log.info("reloading weights of %s after a level-2 sleep", self.engine.checkpoint.name)
        if self.engine.offload is not None:
            # The CPU tier is keyed by token blocks alone and its KV was computed by the weights before the sleep;
            # the files may hold new ones. Emptied first, so a reload that fails halfway leaves none either.
            self.engine.offload.forget_all()
        fresh = load_model(self.engine.checkpoint, runner.device, runner.dtype, runner.tp_rank, runner.tp_size,
                           runner.expert_parallel,  # this rank's shards (MoE: its experts or expert slices)
                           fp8_kv_cache=runner.kv_dtype == FP8_DTYPE)
        try:
            _copy_weights(fresh, runner.model)  # a function of its own: no loop variable here keeps a tensor of it
            runner.weights_version += 1  # the checkpoint's files may hold other weights than at start
            self._reloaded = True  # _after_wake tells the connector (KVConnector.weights_reloaded)
        finally:
            # Each parameter's weight_loader holds its module, and so the parameter: only a cyclic collection frees
            # the copy, and an automatic one of the old generation, where the copy is by now, may be long in coming.
            del fresh
            gc.collect()
            if runner.device.type == "cuda":
                # The copy came from torch's caching allocator, outside the CuMem pools: left cached there it
                # would keep a model's worth of device memory from the KV cache woken next, and through every
                # later sleep.
                torch.cuda.empty_cache()


def _copy_weights(source: torch.nn.Module, into: torch.nn.Module) -> None:
    """Every parameter and buffer of `source` into the same one of `into` (the same model, freshly loaded)."""
    with torch.no_grad():
        for param, new in zip(into.parameters(), source.parameters(), strict=True):
            param.copy_(new)
        for buf, new_buf in zip(into.buffers(), source.buffers(), strict=True):
            buf.copy_(new_buf)
