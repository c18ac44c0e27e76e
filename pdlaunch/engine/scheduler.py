"""Continuous batching: which requests compute how many tokens this step.

Each step gets at most `max_num_batched_tokens` tokens and `max_num_seqs` running requests.
Running requests go first (oldest first): a decode needs 1 token, an unfinished prompt the next
chunk that fits the token budget (chunked prefill). While any running request decodes, the step's
prompt tokens (every chunk of more than one token, or of a prompt) are capped at
`prompt_tokens_while_decoding` (0: no cap): a long prompt then stalls the decodes a chunk at a
time, not for its whole length; a step with no decode takes the whole budget. When blocks run out
the newest running request is preempted (blocks freed, requeued at the front but behind requests
holding KV that arrived, recomputed later: its prefix cache usually makes that cheap). Waiting
requests are admitted oldest first while budget, sequence slots and blocks last, and only in steps
that preempted nothing.

KV connector (kv_transfer/base.py): a request whose KV comes from elsewhere holds blocks for its
whole prompt and sits in `waiting_for_kv` until the connector reports it; a finished request the
connector wants held sits in `held`, its blocks counted as used, until `finished_sending` names it.
A request that ended (aborted, failed) while a transfer may still write into its blocks sits in
`draining` until the connector's `safe_to_free` names it, so no block is reused under a late write.

KV offload (offload/manager.py): a fresh request's device prefix hit is extended with blocks from
the CPU tier; they are loaded into the blocks allocated for it and it runs from the end of the hit
in the same step (the load is ordered before the step's compute).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdlaunch import metrics
from pdlaunch.engine.request import Request, RequestStatus
from pdlaunch.errors import PdlaunchError
from pdlaunch.kv_transfer.base import KVConnector, KVConnectorEvents
from pdlaunch.kv_transfer.params import PrefillAnswer, wants_remote_prefill
from pdlaunch.kvcache.block_manager import BlockManager, PrefixHit

if TYPE_CHECKING:
    from pdlaunch.offload.manager import CPUHit, OffloadManager

log = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    request: Request
    start: int  # first position computed this step (== num_computed_tokens when scheduled)
    num_new_tokens: int
    # The step feeds the request's last known token, so its logits give the next one.
    needs_sample: bool = field(init=False)

    def __post_init__(self) -> None:
        self.needs_sample = self.end == self.request.num_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        connector: KVConnector | None = None,
        offload: OffloadManager | None = None,
        recompute_failed_loads: bool = False,
        prompt_tokens_while_decoding: int = 0,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prompt_tokens_while_decoding = prompt_tokens_while_decoding
        self.connector = connector
        self.offload = offload
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_kv: dict[str, Request] = {}
        self.held: dict[str, Request] = {}  # finished; blocks kept for a remote decode
        self.draining: dict[str, Request] = {}  # ended; blocks kept until no transfer can write them
        # kv_transfer.load_failure_policy recompute: a request whose KV load failed computes its prompt
        # here; while a transfer may still write its old blocks it waits in `recomputing` for safe_to_free.
        self.recompute_failed_loads = recompute_failed_loads
        self.recomputing: dict[str, Request] = {}
        self.num_recomputed_loads = 0
        self._queued_at: dict[str, float] = {}  # request id -> time.monotonic() it was added (queue time)
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.failed: list[Request] = []  # failed while scheduling (connector error); the engine answers them
        self.num_preemptions = 0
        self.prompt_tokens_computed = 0  # prompt positions computed here (recomputes included)
        self.prompt_tokens_cached = 0  # prompt positions from the prefix cache (and CPU tier), not a connector

    # -- admission and removal -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self._queued_at[request.request_id] = time.monotonic()

    def _left_queue(self, request_id: str) -> None:
        """First admission (to run, or to wait for its KV): vllm:request_queue_time_seconds."""
        queued = self._queued_at.pop(request_id, None)
        if queued is not None:
            now = time.monotonic()
            metrics.vllm(metrics.REQUEST_QUEUE_TIME).observe(now - queued)
            self.requests[request_id].scheduled_at = now

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def finish_request(self, request: Request, reason: str, error: str | None = None,
                       error_status: int = 500, abort_load: bool = True,
                       blocks_busy: bool = False, error_param: str | None = None) -> PrefillAnswer | None:
        """End a request in any state; returns the connector's answer (the prefill's kv_transfer_params).

        Only a request that completed normally (stop/length) is offered to the connector's
        `request_finished` (its hold is then honoured); an aborted or failed one never leaves
        params or a remote hold behind. Its blocks are freed at once unless a transfer may still
        write them (`blocks_busy`, or `abort_load` says so): then they wait in `draining`.
        """
        rid = request.request_id
        if request.status == RequestStatus.RUNNING:
            # Async scheduling computed the last full block before its last token was known: register it
            # now, so the next turn of a conversation finds it (decode-side prefix reuse moves one block less).
            self.block_manager.cache_blocks(rid, request.all_token_ids,
                                            min(request.num_computed_tokens, len(request.all_token_ids)))
        if self.recomputing.pop(rid, None) is not None:
            blocks_busy = True  # its failed load still drains: the blocks wait for safe_to_free
        elif request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
            if abort_load:
                self._abort_load(rid)  # nothing was started; drops what matching planned
        elif request.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
            del self.waiting_for_kv[rid]
            if abort_load:
                blocks_busy = self._abort_load(rid) or blocks_busy
        self.requests.pop(rid, None)
        self._queued_at.pop(rid, None)
        request.finish(reason, error, error_status, error_param)
        hold, params = False, None
        if self.connector is not None and reason in ("stop", "length"):
            try:
                hold, params = self.connector.request_finished(
                    rid, request.prompt_token_ids, request.kv_transfer_params, self.block_manager.block_ids(rid))
            except Exception as exc:  # noqa: BLE001 - one request's KV failure must not end the engine
                request.finish("error", f"KV connector failed: {_describe(rid, exc)}", 502)
        if hold and self.block_manager.has_blocks(rid):
            self.held[rid] = request
        elif blocks_busy and self.block_manager.has_blocks(rid):
            self.draining[rid] = request
        else:
            self.block_manager.free(rid)
        return params

    def _abort_load(self, request_id: str) -> bool:
        """connector.abort_load; True when a transfer may still write the blocks. A connector that raises
        is logged and taken at its word that nothing was started."""
        if self.connector is None:
            return False
        try:
            return bool(self.connector.abort_load(request_id))
        except Exception as exc:  # noqa: BLE001 - one request's KV failure must not end the engine
            _describe(request_id, exc)
            return False

    def take_failed(self) -> list[Request]:
        failed, self.failed = self.failed, []
        return failed

    def handle_connector_events(self, events: KVConnectorEvents) -> list[Request]:
        """Apply what the connector reported; returns the requests it failed (finished now)."""
        for rid in events.finished_sending:
            if self.held.pop(rid, None) is not None:
                self.block_manager.free(rid)
        for rid in events.finished_recving:
            request = self.waiting_for_kv.pop(rid, None)
            if request is None:
                continue  # aborted meanwhile, or failed in the same poll
            request.status = RequestStatus.WAITING
            self.block_manager.cache_blocks(rid, request.all_token_ids, request.num_computed_tokens)
            self.waiting.appendleft(request)  # holds its blocks: run it before admitting others
        failed = []
        for rid, message in events.failed_recving.items():
            request = self.waiting_for_kv.get(rid)
            if request is not None and self.recompute_failed_loads:
                self._recompute(request, message, busy=rid in events.draining)
            elif request is not None:
                self.finish_request(request, "error", f"KV transfer failed: {message}", 502, abort_load=False,
                                    blocks_busy=rid in events.draining)
                failed.append(request)
        for rid in events.safe_to_free:
            if self.draining.pop(rid, None) is not None:
                self.block_manager.free(rid)
            elif (request := self.recomputing.pop(rid, None)) is not None:
                self.block_manager.free(rid)
                self._requeue_for_recompute(request)
        return failed

    def _recompute(self, request: Request, message: str, busy: bool) -> None:
        """The request's KV could not be loaded: compute its whole prompt here instead (once its old
        blocks are free of any transfer that may still write them)."""
        rid = request.request_id
        del self.waiting_for_kv[rid]
        request.prompt_recomputed = True
        self.num_recomputed_loads += 1
        metrics.KV_LOAD_RECOMPUTES.inc()
        log.warning("request %s: KV could not be loaded (%s); computing its prompt here "
                    "(kv_transfer.load_failure_policy: recompute)", rid, message)
        if busy and self.block_manager.has_blocks(rid):
            self.recomputing[rid] = request
            return
        self.block_manager.free(rid)
        self._requeue_for_recompute(request)

    def _requeue_for_recompute(self, request: Request) -> None:
        self.prompt_tokens_cached -= request.num_cached_tokens  # counted again when it is admitted
        request.num_cached_tokens, request.num_cached_tokens_set = 0, False
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING  # connector_consulted stays set: no second load
        self._requeue(request)

    def _requeue(self, request: Request) -> None:
        """Queue a request that gave its blocks back at the front, but behind the waiting requests that hold
        theirs (KV that arrived): those run in the blocks they hold, while one ahead of them that needs more
        blocks than are free would wait for their blocks forever once nothing runs."""
        i = 0
        while i < len(self.waiting) and self.block_manager.has_blocks(self.waiting[i].request_id):
            i += 1
        self.waiting.insert(i, request)

    # -- scheduling ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # The prompt tokens this step may still take (the cap holds only in a step that runs a decode).
        cap = self.prompt_tokens_while_decoding
        decoding = any(_decodes(r) and not r.last_token_pending for r in self.running)
        prompt_budget = cap if cap > 0 and decoding else budget
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.last_token_pending:  # async scheduling: its pending token is its last
                i += 1
                continue
            start = request.num_computed_tokens
            n = min(request.num_tokens - start, budget)
            prompt = not _decodes(request)
            if prompt:
                n = min(n, prompt_budget)
                if n == 0:  # this step's prompt tokens are spent (by a prompt ahead of it): the decodes after it run
                    i += 1
                    continue
            self.block_manager.release_out_of_window(request.request_id, start)
            while not self.block_manager.allocate(request.request_id, start + n, start):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, start, n))
                budget -= n
                if prompt:
                    prompt_budget -= n
                i += 1
                continue
            break
        if not out.preempted:
            self._admit_waiting(out, min(budget, prompt_budget))
        for s in out.scheduled:
            self.prompt_tokens_computed += max(0, min(s.end, s.request.num_prompt_tokens) - s.start)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Admit waiting requests, oldest first, into `budget` tokens (every admitted request computes prompt
        tokens, or the last prompt token of KV that came through the connector)."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            rid = request.request_id
            if bm.has_blocks(rid):  # its KV arrived through the connector
                start = request.num_computed_tokens
                n = min(request.num_tokens - start, budget)
                bm.release_out_of_window(rid, start)
                if not bm.allocate(rid, start + n, start):
                    break
            else:
                # Prompt logprobs need every prompt position computed here: no prefix hit (as vLLM).
                usable = 0 if request.wants_prompt_logprobs else request.num_tokens - 1
                hit = bm.match_prefix(request.all_token_ids, usable)
                cpu_hit = self.offload.match(request.all_token_ids, hit, usable) \
                    if self.offload is not None else None
                start = cpu_hit.num_tokens if cpu_hit is not None else hit.num_tokens
                n = min(request.num_tokens - start, budget)
                if self.connector is not None and not request.connector_consulted:
                    try:
                        parked = self._consult_connector(request, hit, n, cpu_hit)
                    except Exception as exc:  # noqa: BLE001 - fail this request, keep serving the others
                        self.finish_request(request, "error", f"KV transfer failed: {_describe(rid, exc)}", 502)
                        self.failed.append(request)
                        continue
                    if parked is None:
                        break  # not enough free blocks yet
                    if parked:
                        continue
                else:
                    if not bm.allocate(rid, start + n, start, hit):
                        break
                    if not self._load_from_cpu(request, cpu_hit):
                        continue
                    self._note_cached(request, start)
                request.num_computed_tokens = start
            self.waiting.popleft()
            self._left_queue(rid)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, start, n))
            budget -= n

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
        request.connector_consulted = True
        self._note_cached(request, k + ext, local=k)
        if remote:
            metrics.DECODE_PREFIX_HIT_TOKENS.inc(k)  # the load skips these (decode-side prefix reuse)
            self.connector.start_load(rid, request.prompt_token_ids, params, self.block_manager.block_ids(rid), k, ext)
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
            self.offload.start_load(self.block_manager.block_ids(rid), cpu_hit)
        except Exception as exc:  # noqa: BLE001 - fail this request, keep serving the others
            log.error("request %s: loading its prefix from the CPU offload tier failed: %s", rid, exc,
                      exc_info=not isinstance(exc, PdlaunchError))
            text = exc.render() if isinstance(exc, PdlaunchError) else f"{type(exc).__name__}: {exc}"
            self.finish_request(request, "error", f"loading its cached prefix from the CPU offload tier "
                                f"(--kv-offload-gb) failed: {text}", 500)
            self.failed.append(request)
            return False
        return True

    def _note_cached(self, request: Request, num_cached: int, local: int | None = None) -> None:
        """Once per admission: cached prompt positions (`local` of them from this instance's prefix
        cache and CPU tier, the rest from a connector). The request reports only the local ones as
        usage.prompt_tokens_details.cached_tokens: tokens served from a prefix cache, which KV a decode
        loaded from its prefill is not (vLLM counts those too; ours read 0 on a first request)."""
        if not request.num_cached_tokens_set:
            request.num_cached_tokens = num_cached if local is None else local
            request.num_cached_tokens_set = True
            self.prompt_tokens_cached += request.num_cached_tokens
            metrics.vllm(metrics.PREFIX_CACHE_QUERIES).inc(request.num_prompt_tokens)
            metrics.vllm(metrics.PREFIX_CACHE_HITS).inc(num_cached if local is None else local)
            metrics.PROMPT_TOKENS_COMPUTED.inc(max(0, request.num_prompt_tokens - num_cached))

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self._requeue(request)
        self.num_preemptions += 1
        metrics.vllm(metrics.NUM_PREEMPTIONS).inc()

    def after_step(self, out: SchedulerOutput) -> None:
        """The step's KV is written: advance progress and register newly full blocks."""
        for s in out.scheduled:
            request = s.request
            request.num_computed_tokens = s.end
            # only positions whose token the host knows (async scheduling: the sampled one may be pending)
            self.block_manager.cache_blocks(request.request_id, request.all_token_ids,
                                            min(s.end, len(request.all_token_ids)))


def _describe(request_id: str, exc: Exception) -> str:
    """Log a connector exception for one request (a traceback only for what is not our own error type)
    and return the text its client gets."""
    log.error("KV connector failed for request %s: %s", request_id, exc, exc_info=not isinstance(exc, PdlaunchError))
    return exc.render() if isinstance(exc, PdlaunchError) else f"{type(exc).__name__}: {exc}"


def _decodes(request: Request) -> bool:
    """True when the running request's next step computes one generated token (a decode), not prompt tokens
    (a chunk of its prompt, or of prompt and output recomputed after a preemption)."""
    return request.num_tokens - request.num_computed_tokens == 1 and \
        request.num_computed_tokens >= request.num_prompt_tokens
