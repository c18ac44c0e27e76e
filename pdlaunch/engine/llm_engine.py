"""The engine of one instance: requests in, RequestOutputs out, one `step()` at a time.

A step polls the KV connector, schedules, runs the model, samples, detokenizes, applies the stop
rules and frees what finished. With async scheduling (engine/async_step.py, the default with CUDA) a step launches
its forward before it reads the previous step's sampled tokens, so its outputs are those of the previous
step. Not thread-safe: the server drives it from one engine thread.

Here: its construction, sleep mode, what it reports and its shutdown. Its requests (add, abort, release held KV)
are in engine/engine_requests.py, the step and its outputs in engine/engine_step.py.
"""

from __future__ import annotations

import itertools
import logging

import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec, instance_cache
from pdlaunch.distributed.executor import create_executor
from pdlaunch.distributed.rank import kv_cache_spec
from pdlaunch.engine.allocator_watch import allocator_watch
from pdlaunch.engine.arrival_window import ArrivalWindow
from pdlaunch.engine.async_step import InFlight
from pdlaunch.engine.engine_requests import EngineRequests
from pdlaunch.engine.engine_step import EngineStep
from pdlaunch.engine.output_processor import OutputProcessor
from pdlaunch.engine.outputs import RequestOutput
from pdlaunch.engine.request import Request, RequestStatus
from pdlaunch.engine.sampler import Sampler
from pdlaunch.engine.scheduler import Scheduler
from pdlaunch.engine.sleep_mode import EngineSleep
from pdlaunch.engine.stats import EngineStats, engine_stats
from pdlaunch.engine.step_clock import step_clock
from pdlaunch.engine.structured_output import grammar_backend
from pdlaunch.errors import EngineError
from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnector
from pdlaunch.kv_transfer.params import params_key
from pdlaunch.kv_transfer.push_params import prefill_side_channels
from pdlaunch.kvcache.block_integrity import BlockIntegrityError
from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.memory.heap import freeze_startup_heap, thaw_heap
from pdlaunch.memory.platform import current_device_index, resolve_device, set_device
from pdlaunch.memory.sleep import SleepResult, WakeResult
from pdlaunch.metrics.instance import KV_BLOCKS_TOTAL, MODEL_DTYPES
from pdlaunch.metrics.vllm_series import engine_info
from pdlaunch.model.checkpoint import load_checkpoint, resolve_dtype, weight_dtype_name
from pdlaunch.offload.manager import OffloadManager

log = logging.getLogger(__name__)


class LLMEngine(EngineRequests, EngineStep):
    def __init__(self, config: DeploymentConfig, instance: InstanceSpec | None = None,
                 connector: KVConnector | None = None) -> None:
        self.config = config
        self.instance = instance
        self.role = instance.role if instance is not None else "colocated"
        self.engine_id = instance.engine_id if instance is not None else config.kv_transfer.engine_id
        self.device = self._bind_device(resolve_device(instance.device if instance is not None else config.device))
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        torch.manual_seed(config.model.seed)

        self.checkpoint = load_checkpoint(config.model.path, config.model.quantization)
        self.tokenizer = self.checkpoint.tokenizer
        if config.model.chat_template is not None:
            self.tokenizer.override_chat_template(config.model.chat_template)
        arch = self.checkpoint.arch
        self.vocab_size = arch.vocab_size
        self.max_model_len = self._max_model_len()
        self.block_size = config.cache.block_size
        secret = config.security.deployment_secret
        self._params_key = params_key(secret) if secret else None  # signs and checks kv_transfer_params
        self._prefill_side_channels = prefill_side_channels()  # where unsigned push params may point
        self.tp_size = instance.tp if instance is not None else config.parallel.tp
        # tp > 1: this process becomes TP rank 0 and spawns the other ranks (pdlaunch.distributed).
        self.executor = create_executor(config, instance, self.checkpoint, self.device, self.dtype,
                                        self.max_model_len, self.engine_id)
        self.connector: KVConnector | None = None
        try:
            self._build(config, instance, connector)
        except BaseException:
            self._discard_partial_build()
            raise

    def _build(self, config: DeploymentConfig, instance: InstanceSpec | None, connector: KVConnector | None) -> None:
        """What the engine builds once its executor runs (a failure here shuts that executor down: __init__)."""
        self.engine_id = self.executor.engine_id  # rank 0's, adopted by every rank (vLLM #39907)
        self.runner = self.executor.runner
        groups = self.runner.groups
        self.block_manager = BlockManager(self.runner.num_blocks, self.block_size,
                                          [g.sliding_window for g in groups], config.cache.enable_prefix_caching)
        if connector is None and instance is not None and self.role in ("prefill", "decode"):
            connector = self._create_connector(config, instance)
        self.connector = connector
        if connector is not None:
            self.connector = connector = self.executor.wrap_connector(connector)  # tp > 1: mirrored to every rank
            connector.register_kv_caches(self.kv_cache_spec())
        self.offload = self._create_offload(config)
        self.scheduler = Scheduler(self.block_manager, config.scheduler.max_num_seqs,
                                   config.scheduler.token_budget(self.role), connector, self.offload,
                                   recompute_failed_loads=config.kv_transfer.load_failure_policy == "recompute",
                                   prompt_tokens_while_decoding=config.scheduler.prompt_tokens_while_decoding)
        self.sampler = Sampler(self.device, config.model.seed, self.tokenizer.eos_token_ids,
                               lambda text: self.tokenizer.encode(text, add_special_tokens=False))
        self.outputs = OutputProcessor(self.tokenizer.decode, self.tokenizer.eos_token_ids, self.max_model_len,
                                       grammar_backend(self.tokenizer, self.vocab_size))
        self._arrival = itertools.count()
        self._in_flight: InFlight | None = None  # the launched step whose sampled tokens the host has not read
        self.clock = step_clock(self.device)  # pdlaunch_engine_step_seconds, timed on the device
        self._window = ArrivalWindow()  # how long the loop may wait for arrivals before the next step
        self.allocator = allocator_watch(self.device)  # its retries stall steps: counted and logged
        self.async_scheduling = self._async_scheduling(config)
        # first tokens taken from a prefill's answer, out next step (or take_admitted) unless their request was aborted
        self._admitted: list[tuple[Request, RequestOutput]] = []
        self._shut_down = False
        self._sleep = EngineSleep(self) if config.model.enable_sleep_mode else None
        KV_BLOCKS_TOTAL.set(self.block_manager.num_blocks)
        # /info and pdlaunch_model_dtypes_info: e.g. "fp8 block 128x128 (checkpoint)" and "float8_e4m3fn".
        self.weight_dtype = weight_dtype_name(self.checkpoint, self.dtype, self.device)
        self.kv_cache_dtype = str(self.runner.kv_dtype).removeprefix("torch.")
        MODEL_DTYPES.info({"weight_dtype": self.weight_dtype, "kv_cache_dtype": self.kv_cache_dtype})
        cache = instance_cache(config, instance)
        engine_info(self.max_model_len, {
            "block_size": self.block_size, "cache_dtype": cache.kv_cache_dtype,
            "enable_prefix_caching": cache.enable_prefix_caching,
            "gpu_memory_utilization": cache.gpu_memory_utilization, "num_gpu_blocks": self.block_manager.num_blocks,
            "num_gpu_blocks_override": cache.num_gpu_blocks, "kv_offload_gb": cache.kv_offload_gb})
        log.info("engine %s (%s) ready: %s on %s/%s, %d KV blocks of %d tokens, max_model_len %d",
                 self.engine_id, self.role, self.checkpoint.name, self.device, self.dtype,
                 self.block_manager.num_blocks, self.block_size, self.max_model_len)
        freeze_startup_heap()  # no collector walk over the startup heap while serving (memory/heap.py)

    def _discard_partial_build(self) -> None:
        """The build failed after the executor started: its TP ranks and the runner's memory, a connector already
        made (its agent, side channel) and the offload tier go before the error does; a failure here is logged,
        not raised over the build's own."""
        parts = (("CPU offload tier", getattr(self, "offload", None)), ("KV connector", self.connector),
                 ("executor", self.executor))
        for what, part in parts:
            if part is None:
                continue
            try:
                part.shutdown()
            except Exception:  # noqa: BLE001 - the build's error is the one to report
                log.exception("shutting down the %s of a failed engine build failed", what)

    # -- construction helpers --------------------------------------------------------------------
    def _bind_device(self, device: str) -> torch.device:
        if device == "cuda":
            if not torch.cuda.is_available():
                raise EngineError("CUDA was asked for but no CUDA device is visible", field="device",
                                  hint="use --device cpu or auto")
            index = self.instance.devices[0] if self.instance is not None and self.instance.devices else \
                current_device_index()
            set_device(index)
            return torch.device("cuda", index)
        if device != "cpu":
            raise EngineError(f"unknown device {device!r}", field="device", hint="use auto, cpu or cuda")
        return torch.device("cpu")

    def _async_scheduling(self, config: DeploymentConfig) -> bool:
        """scheduler.async_scheduling where it can run: one rank (the other ranks would need the device ids)
        and no KV offload (its copies are ordered against one step at a time). Unset: on with CUDA only. On CPU
        the host computes each step itself, so nothing overlaps, and reading the tokens a step later only holds
        each one back (demo model, colocated: TTFT 182 -> 127 ms without it; benchmarks/RESULTS.md)."""
        wanted = config.scheduler.async_scheduling
        if wanted is None:
            wanted = self.device.type == "cuda"
        if not wanted:
            return False
        if self.tp_size > 1 or self.offload is not None:
            log.info("async scheduling is off: it runs with TP 1 and without KV offload")
            return False
        return True

    def _max_model_len(self) -> int:
        limit = self.checkpoint.arch.max_position_embeddings
        wanted = self.config.model.max_model_len
        if wanted is None:
            return limit
        if wanted > limit:
            raise EngineError(f"max_model_len {wanted} exceeds the model's {limit} positions",
                              field="model.max_model_len", hint=f"use at most {limit}")
        return wanted

    @staticmethod
    def _create_connector(config: DeploymentConfig, instance: InstanceSpec) -> KVConnector | None:
        try:
            from pdlaunch.kv_transfer.factory import create_connector
        except ImportError as exc:
            log.warning("no KV connector available (%s): running %s without KV transfer", exc, instance.role)
            return None
        return create_connector(config, instance)

    def _create_offload(self, config: DeploymentConfig) -> OffloadManager | None:
        """The CPU tier for KV blocks evicted from the prefix cache (cache.kv_offload_gb > 0)."""
        if config.cache.kv_offload_gb <= 0:
            return None
        if not config.cache.enable_prefix_caching:
            raise EngineError("KV offload needs prefix caching (blocks are found again by prefix)",
                              field="cache.kv_offload_gb", hint="enable prefix caching or set --kv-offload-gb 0")
        if self.tp_size != 1:
            raise EngineError(f"KV offload runs with tensor-parallel size 1, got {self.tp_size}",
                              field="cache.kv_offload_gb", hint="set --kv-offload-gb 0 or --tp 1")
        return OffloadManager(self.block_manager, lambda: self.runner.kv_caches, config.cache.kv_offload_gb)

    def kv_cache_spec(self) -> KVCacheSpec:
        return kv_cache_spec(self.checkpoint, self.runner)  # rank 0's slice under TP

    # -- sleep mode ------------------------------------------------------------------------------
    def _sleep_mode(self) -> EngineSleep:
        if self._sleep is None:
            raise EngineError("sleep mode is not enabled", field="model.enable_sleep_mode",
                              hint="start the instance with --enable-sleep-mode")
        return self._sleep

    def sleep(self, level: int = 1) -> SleepResult:
        """Give the device memory back: level 1 keeps the weights in CPU memory, 2 discards them."""
        if not self.has_unfinished_requests():
            self._finish_in_flight()  # only finished requests' tokens: the device must be done with the KV
        if self.offload is not None:
            self.offload.wait_idle()  # no copy may touch the KV cache while it is released
        return self._sleep_mode().sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> WakeResult:
        """Take memory again for `tags` ("weights", "kv_cache"; None = both)."""
        return self._sleep_mode().wake_up(tags)

    def is_sleeping(self) -> bool:
        return self._sleep is not None and self._sleep.is_sleeping()

    # -- state -----------------------------------------------------------------------------------
    @property
    def rank_engine_ids(self) -> list[str]:
        """engine_id as each TP rank holds it, in rank order (all equal after the sync); /info shows it."""
        return self.executor.rank_engine_ids()

    @property
    def rank_nodes(self) -> list[str]:
        """The node address of each TP rank when the executor knows it (Ray, spanning groups); else []."""
        return self.executor.rank_nodes()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def is_quiescent(self) -> bool:
        """Nothing for a step to do until a new request comes: no request, no KV held for a decode or
        draining, no load or recompute, no sampled step in flight, no CPU-tier job. The engine loop then
        waits longer between idle steps (what such a step still polls can wait: a Forget notification is
        read before the next request is scheduled, a dead TP rank is found a fraction of a second later)."""
        s = self.scheduler
        return not (s.requests or s.held or s.draining or s.waiting_for_kv or s.recomputing
                    or self._admitted or self._in_flight is not None
                    or (self.offload is not None and not self.offload.idle))

    # -- observability ---------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return engine_stats(self.scheduler, self.block_manager, self.offload)

    def check_integrity(self) -> None:
        """Raise BlockIntegrityError unless the block manager is consistent and exactly the
        requests that should hold blocks (running, loaded or loading KV, held, draining) do."""
        self.block_manager.check_integrity()
        if self.offload is not None:
            self.offload.check_integrity()
        s = self.scheduler
        holders = {r.request_id for r in s.running} | set(s.waiting_for_kv) | set(s.held) | set(s.draining)
        holders |= set(s.recomputing)
        holders |= {r.request_id for r in s.waiting if self.block_manager.has_blocks(r.request_id)}
        if set(self.block_manager.tables) != holders:
            raise BlockIntegrityError(
                f"block tables of {sorted(self.block_manager.tables)} but holders {sorted(holders)}")
        for r in s.waiting:
            if r.status == RequestStatus.PREEMPTED and self.block_manager.has_blocks(r.request_id):
                raise BlockIntegrityError(f"preempted request {r.request_id} still holds blocks")
        if set(self.outputs.tracked) != set(s.requests):
            raise BlockIntegrityError(f"engine tracks {sorted(self.outputs.tracked)}, scheduler {sorted(s.requests)}")

    def shutdown(self) -> None:
        """Abort what is left, release the connector and the device memory. Idempotent."""
        if self._shut_down:
            return
        self._shut_down = True
        for request_id in list(self.outputs.tracked):
            self.abort_request(request_id)
        self._finish_in_flight()  # every request ended: nothing to emit, but the device must be done
        for kept in (self.scheduler.held, self.scheduler.draining):
            for request_id in list(kept):
                kept.pop(request_id)
                self.block_manager.free(request_id)
        # Each part even when one before it raises (an offload transfer stuck past its timeout must not leave the
        # connector's agent or the TP ranks and their device memory behind); the first error is raised at the end.
        try:
            if self.offload is not None:
                self.offload.shutdown()
        finally:
            try:
                if self.connector is not None:
                    self.connector.shutdown()
            finally:
                try:
                    self.executor.shutdown()
                finally:
                    thaw_heap()
