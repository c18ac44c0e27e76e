"""What the scheduler holds: its queues and counters, and the moves between them outside a step's schedule
(a request added, ended, its KV load reported or failed).

KV connector (kv_transfer/base.py): a request whose KV comes from elsewhere holds blocks for its
whole prompt and sits in `waiting_for_kv` until the connector reports it; a finished request the
connector wants held sits in `held`, its blocks counted as used, until `finished_sending` names it.
A request that ended (aborted, failed) while a transfer may still write into its blocks sits in
`draining` until the connector's `safe_to_free` names it, so no block is reused under a late write.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from pdlaunch.engine.request import Request, RequestStatus
from pdlaunch.errors import PdlaunchError
from pdlaunch.kv_transfer.base import KVConnector, KVConnectorEvents
from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer, wants_remote_prefill
from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.metrics.kv_transfer import KV_LOAD_RECOMPUTES

if TYPE_CHECKING:
    from pdlaunch.offload.manager import OffloadManager

log = logging.getLogger("pdlaunch.engine.scheduler")  # the scheduler's one logger name, across its files


class SchedulerState:
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
        # (request, tokens) of this step's prefix hits that a CPU-tier load brings: counted once it did not fail
        self._cpu_hits: list[tuple[Request, int]] = []

    # -- requests added and ended ----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self._queued_at[request.request_id] = time.monotonic()

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
            if not request.connector_consulted:  # its load never started: the prefill still holds its KV for it
                self.release_unloaded(rid, request.prompt_token_ids, request.kv_transfer_params)
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
                request.finish("error", f"KV connector failed: {describe(rid, exc)}", 502)
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
            describe(request_id, exc)
            return False

    def release_unloaded(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: KVTransferParams | None) -> None:
        """A PD decode request ends before its KV load started (aborted or failed while queued, ended by its
        prefill's first token at admission, refused by add_request): connector.release_unloaded tells the prefill to
        drop its hold now, not at its lease's end. A connector that raises is logged: the lease frees the blocks."""
        if self.connector is None or not wants_remote_prefill(kv_transfer_params):
            return
        try:
            self.connector.release_unloaded(request_id, prompt_token_ids, kv_transfer_params)
        except Exception as exc:  # noqa: BLE001 - one request's KV failure must not end the engine
            describe(request_id, exc)

    def take_failed(self) -> list[Request]:
        failed, self.failed = self.failed, []
        return failed

    # -- what the KV connector reported ----------------------------------------------------------
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
                request.num_external_tokens = 0  # its KV never came
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
        KV_LOAD_RECOMPUTES.inc()
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
        request.num_external_tokens = 0  # its load failed: none came
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


def describe(request_id: str, exc: Exception) -> str:
    """Log a connector exception for one request (a traceback only for what is not our own error type)
    and return the text its client gets."""
    log.error("KV connector failed for request %s: %s", request_id, exc, exc_info=not isinstance(exc, PdlaunchError))
    return exc.render() if isinstance(exc, PdlaunchError) else f"{type(exc).__name__}: {exc}"
