"""Admitting waiting requests, oldest first, while the step's budget, sequence slots and blocks last: each one's
prefix found in the prefix cache, the KV connector consulted once for a fresh request, and queue time recorded.

KV offload (offload/manager.py): a fresh request's device prefix hit is extended with blocks from
the CPU tier; they are loaded into the blocks allocated for it and it runs from the end of the hit
in the same step (the load is ordered before the step's compute). A load that fails is known before
that compute: `fail_cpu_loads` ends its request and takes it out of the step. The CPU-tier part of a hit
counts as a prefix-cache hit only then, once its load did not fail (vllm:prefix_cache_hits, the request's
num_cached_tokens that vllm:prompt_tokens_cached and _by_source read, the stats' prompt_tokens_cached).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pdlaunch.engine.request import Request, RequestStatus
from pdlaunch.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from pdlaunch.engine.scheduler_state import SchedulerState, describe
from pdlaunch.errors import PdlaunchError
from pdlaunch.kv_transfer.params import wants_remote_prefill
from pdlaunch.kvcache.block_manager import PrefixHit
from pdlaunch.metrics.kv_transfer import DECODE_PREFIX_HIT_TOKENS
from pdlaunch.metrics.vllm_series import (
    EXTERNAL_PREFIX_CACHE_HITS,
    EXTERNAL_PREFIX_CACHE_QUERIES,
    PREFIX_CACHE_HITS,
    PREFIX_CACHE_QUERIES,
    REQUEST_QUEUE_TIME,
    vllm,
)

if TYPE_CHECKING:
    from pdlaunch.offload.loads import CPUHit

log = logging.getLogger("pdlaunch.engine.scheduler")  # the scheduler's one logger name, across its files


class SchedulerAdmission(SchedulerState):
    def _left_queue(self, request_id: str) -> None:
        """First admission (to run, or to wait for its KV): vllm:request_queue_time_seconds."""
        queued = self._queued_at.pop(request_id, None)
        if queued is not None:
            now = time.monotonic()
            vllm(REQUEST_QUEUE_TIME).observe(now - queued)
            self.requests[request_id].scheduled_at = now

    def _admit_waiting(self, out: SchedulerOutput, budget: int, prompt_budget: int) -> None:
        """Admit waiting requests, oldest first, into `budget` tokens, of them at most `prompt_budget` prompt
        tokens (the cap beside decodes). A request whose whole prompt's KV came through the connector computes only
        its last prompt token, which yields its first output as a decode's row does: it takes `budget` alone."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            rid = request.request_id
            decode_row = False  # computes only the last prompt token of KV that arrived: not charged to the cap
            if bm.has_blocks(rid):  # its KV arrived through the connector (or, consulted past the cap, none comes)
                start = request.num_computed_tokens
                left = request.num_tokens - start
                decode_row = left == 1
                n = min(left, budget if decode_row else prompt_budget)
                if n == 0:  # the cap is spent and it has prompt tokens to compute: oldest first, so none after it
                    break
                bm.release_out_of_window(rid, start)
                if not bm.allocate(rid, start + n, start):
                    break
            else:
                # Past a spent prompt cap only a PD request goes on: starting its load computes nothing now.
                if prompt_budget <= 0 and not self._starts_remote_load(request):
                    break
                # Prompt logprobs need every prompt position computed here: no prefix hit (as vLLM).
                usable = 0 if request.wants_prompt_logprobs else request.num_tokens - 1
                hit = bm.match_prefix(request.all_token_ids, usable)
                cpu_hit = self.offload.match(request.all_token_ids, hit, usable) \
                    if self.offload is not None else None
                start = cpu_hit.num_tokens if cpu_hit is not None else hit.num_tokens
                n = min(request.num_tokens - start, prompt_budget)
                if self.connector is not None and not request.connector_consulted:
                    try:
                        parked = self._consult_connector(request, hit, n, cpu_hit)
                    except Exception as exc:  # noqa: BLE001 - fail this request, keep serving the others
                        self.finish_request(request, "error", f"KV transfer failed: {describe(rid, exc)}", 502)
                        self.failed.append(request)
                        continue
                    if parked is None:
                        break  # not enough free blocks yet
                    if parked:
                        continue
                    if n == 0:  # consulted past the cap, nothing to load: it computes later, within the cap
                        request.num_computed_tokens = start
                        break
                else:
                    if not bm.allocate(rid, start + n, start, hit):
                        break
                    if not self._load_from_cpu(request, cpu_hit):
                        continue
                    self._note_cached(request, start, from_cpu=start - hit.num_tokens)
                request.num_computed_tokens = start
            self.waiting.popleft()
            self._left_queue(rid)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, start, n))
            budget -= n
            # A decode row spends the budget, not the cap: prompt tokens after it get what is left of either.
            prompt_budget = min(prompt_budget if decode_row else prompt_budget - n, budget)

    def _starts_remote_load(self, request: Request) -> bool:
        """The connector has not seen the request yet and it asks for a remote prefill's KV (a PD decode leg)."""
        return (self.connector is not None and not request.connector_consulted
                and wants_remote_prefill(request.kv_transfer_params))

    def _consult_connector(self, request: Request, hit: PrefixHit, num_new_tokens: int,
                           cpu_hit: CPUHit | None = None) -> bool | None:
        """Ask the connector about a fresh request. Returns True when the request left the queue
        (parked waiting for KV, or failed: its CPU-tier load could not be queued), False when it
        runs `num_new_tokens` now (blocks allocated), None when blocks ran out (nothing changed).
        The local prefix (device hit, extended by `cpu_hit` from the CPU offload tier) is not
        asked of the connector."""
        assert self.connector is not None
        rid = request.request_id
        k = cpu_hit.num_tokens if cpu_hit is not None else hit.num_tokens
        params = request.kv_transfer_params
        ext = self.connector.get_num_new_matched_tokens(rid, request.prompt_token_ids, params, k)
        ext = max(0, min(ext, request.num_tokens - 1 - k))
        remote = ext > 0 or wants_remote_prefill(params)
        total = request.num_tokens if remote else k + num_new_tokens
        # The load fills a sliding-window group only from k + ext - window on: entries before that stay -1,
        # else cache_blocks would register never-written blocks as this prompt's prefix.
        if not self.block_manager.allocate(rid, total, k + ext, hit):
            return None
        if not self._load_from_cpu(request, cpu_hit):
            return True
        self._note_cached(request, k + ext, local=k, from_cpu=k - hit.num_tokens)
        vllm(EXTERNAL_PREFIX_CACHE_QUERIES).inc(request.num_prompt_tokens)
        vllm(EXTERNAL_PREFIX_CACHE_HITS).inc(ext)
        if remote:
            DECODE_PREFIX_HIT_TOKENS.inc(k)  # the load skips these (decode-side prefix reuse)
            if self.offload is not None:  # the blocks just allocated may be evicted ones still to store
                self.offload.before_external_write()
            self.connector.start_load(rid, request.prompt_token_ids, params, self.block_manager.block_ids(rid), k, ext)
        # Set once its load started: a request that ends before (its CPU-tier load failed, this raised) never had
        # one, so finish_request has the prefill told to drop its hold (release_unloaded).
        request.connector_consulted = True
        if ext == 0:
            return False
        self.waiting.popleft()
        self._left_queue(rid)
        request.num_computed_tokens = k + ext  # valid once the connector reports the load
        request.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        self.waiting_for_kv[rid] = request
        return True

    def _load_from_cpu(self, request: Request, cpu_hit: CPUHit | None) -> bool:
        """Queue the CPU-tier part of a prefix hit into the blocks just allocated for it. False when that
        failed: nothing was queued into the blocks, so the request ends with an error at once (its blocks
        freed, the engine answers it from `failed`) and the other requests go on."""
        if cpu_hit is None or self.offload is None:
            return True
        rid = request.request_id
        try:
            self.offload.start_load(rid, self.block_manager.block_ids(rid), cpu_hit)
        except Exception as exc:  # noqa: BLE001 - fail this request, keep serving the others
            log.error("request %s: loading its prefix from the CPU offload tier failed: %s", rid, exc,
                      exc_info=not isinstance(exc, PdlaunchError))
            text = exc.render() if isinstance(exc, PdlaunchError) else f"{type(exc).__name__}: {exc}"
            self.finish_request(request, "error", f"loading its cached prefix from the CPU offload tier "
                                f"(--kv-offload-gb) failed: {text}", 500)
            self.failed.append(request)
            return False
        return True

    def fail_cpu_loads(self, out: SchedulerOutput, failures: list[tuple[str, str]]) -> list[Request]:
        """End the requests whose CPU-tier load failed after it was queued (`failures`: request id, error), before
        the step's compute: each leaves `out`, its client gets a 500 and its blocks go back to the free list (a PD
        decode's, once its connector load can no longer write them); the others go on. Every load of the step is
        known by now: the prefix hits of those that did not fail are counted. Returns those ended."""
        self._count_cpu_hits({rid for rid, _ in failures})
        failed = []
        for rid, error in failures:
            request = self.requests.get(rid)
            if request is None:
                continue  # ended meanwhile
            for s in [s for s in out.scheduled if s.request is request]:
                out.scheduled.remove(s)
                self.prompt_tokens_computed -= max(0, min(s.end, request.num_prompt_tokens) - s.start)
            # Its blocks hold what the load left: finish_request must not register them as its prefix.
            request.num_computed_tokens = 0
            request.num_external_tokens = 0  # a PD decode's connector load is aborted with it: none came
            self.finish_request(request, "error", "loading its cached prefix from the CPU offload tier "
                                f"(--kv-offload-gb) failed: {error}", 500)
            failed.append(request)
        return failed

    def _note_cached(self, request: Request, num_cached: int, local: int | None = None, from_cpu: int = 0) -> None:
        """Once per admission: cached prompt positions (`local` of them from this instance's prefix
        cache and CPU tier, the rest from a connector). The request reports only the local ones as
        usage.prompt_tokens_details.cached_tokens: tokens served from a prefix cache, which KV a decode
        loaded from its prefill is not (vLLM counts those too; ours read 0 on a first request). `from_cpu`
        of the local ones come with a CPU-tier load just queued: hits once it did not fail (_count_cpu_hits)."""
        if not request.num_cached_tokens_set:
            request.num_cached_tokens = num_cached if local is None else local
            request.num_external_tokens = num_cached - request.num_cached_tokens
            request.num_cached_tokens_set = True
            self.prompt_tokens_cached += request.num_cached_tokens - from_cpu
            vllm(PREFIX_CACHE_QUERIES).inc(request.num_prompt_tokens)
            vllm(PREFIX_CACHE_HITS).inc(request.num_cached_tokens - from_cpu)
            if from_cpu:
                self._cpu_hits.append((request, from_cpu))

    def _count_cpu_hits(self, failed: set[str]) -> None:
        """The CPU-tier parts of this step's prefix hits, once every load is known: a load that did not fail
        counts as hits; a failed one brought none of its tokens, so its request no longer reports them as cached."""
        for request, tokens in self._cpu_hits:
            if request.request_id in failed:
                request.num_cached_tokens -= tokens
            else:
                self.prompt_tokens_cached += tokens
                vllm(PREFIX_CACHE_HITS).inc(tokens)
        self._cpu_hits.clear()
