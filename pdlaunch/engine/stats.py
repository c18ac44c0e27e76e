"""What an engine reports about itself: the stats dict (/info, tests) and the Prometheus gauges it sets each step."""

from __future__ import annotations

from typing import TypedDict

from pdlaunch.engine.scheduler import Scheduler
from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.metrics.instance import KV_BLOCKS_USED, REQUESTS_RUNNING, REQUESTS_WAITING
from pdlaunch.metrics.vllm_series import KV_CACHE_USAGE, NUM_REQUESTS_RUNNING, NUM_REQUESTS_WAITING, vllm
from pdlaunch.offload.manager import OffloadManager


class EngineStats(TypedDict):
    num_running: int
    # Waiting to run: for blocks or a sequence slot, or to compute the prompt whose KV load failed
    # (kv_transfer.load_failure_policy recompute: num_recomputing of them wait for their old blocks to be safe to free)
    num_waiting: int
    num_waiting_for_kv: int  # waiting for their KV from a prefill instance
    num_recomputing: int
    num_recomputed_loads: int  # requests whose KV load failed and that computed their prompt here, since start
    num_held: int
    num_blocks_total: int
    num_blocks_used: int
    num_preemptions: int
    prompt_tokens_computed: int
    prompt_tokens_cached: int
    offload_stored_blocks: int  # CPU offload tier (0 when off): logical blocks stored, loaded, hit
    offload_loaded_blocks: int
    offload_hit_blocks: int


def engine_stats(s: Scheduler, block_manager: BlockManager, offload: OffloadManager | None) -> EngineStats:
    return EngineStats(
        num_running=len(s.running),
        num_waiting=len(s.waiting) + len(s.recomputing),
        num_waiting_for_kv=len(s.waiting_for_kv),
        num_recomputing=len(s.recomputing),
        num_recomputed_loads=s.num_recomputed_loads,
        num_held=len(s.held),
        num_blocks_total=block_manager.num_blocks,
        num_blocks_used=block_manager.num_used_blocks(),
        num_preemptions=s.num_preemptions,
        prompt_tokens_computed=s.prompt_tokens_computed,
        prompt_tokens_cached=s.prompt_tokens_cached,
        offload_stored_blocks=offload.stored_blocks if offload is not None else 0,
        offload_loaded_blocks=offload.loaded_blocks if offload is not None else 0,
        offload_hit_blocks=offload.hit_blocks if offload is not None else 0,
    )


def update_metrics(s: Scheduler, block_manager: BlockManager) -> None:
    """The queue and KV-usage gauges, ours and vLLM's (after every step)."""
    used = block_manager.num_used_blocks()
    waiting = len(s.waiting) + len(s.waiting_for_kv) + len(s.recomputing)  # KV waits count as waiting
    KV_BLOCKS_USED.set(used)
    REQUESTS_RUNNING.set(len(s.running))
    REQUESTS_WAITING.set(waiting)
    vllm(NUM_REQUESTS_RUNNING).set(len(s.running))
    vllm(NUM_REQUESTS_WAITING).set(waiting)
    vllm(KV_CACHE_USAGE).set(used / max(1, block_manager.num_blocks))
