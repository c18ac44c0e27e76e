"""Per-rank KV transfer: every TP rank has its own connector (own NIXL agent, own side channel).

The scheduler runs on rank 0 and sees one `TPConnector`. It calls rank 0's connector and mirrors
each scheduler-side call to the other ranks' connectors with the step stream, so every rank holds,
loads and frees the same block ids (each for its own KV-head slice). A request counts as sent or
received only when every rank reported it; a failure on any rank fails it (and the other ranks
drop their part of the load).

Which prefill rank a decode rank reads: prefill's response carries `remote_ports` (the side channel
of each prefill rank) and `remote_hosts` (each rank's advertised address: a group spanning nodes
has ranks on several); decode rank r of a same-size group reads prefill rank r. Between different
TP sizes each rank's connector reads the prefill ranks holding its KV heads (kv_transfer/reshard.py).

The KV transfer series (metrics/kv_transfer.py) are rank 0's to count for the group: ranks 1..T-1 run in worker
processes whose series nobody serves. Each rank's connector reports how each of its loads ended (LoadOutcome, in its
events); a request counts a failure once, when its first rank failed, and, once every rank's KV is in, the bytes of
all ranks, with the slowest rank's times (`RankLoads`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from pdlaunch.distributed.messages import (
    AbortLoad,
    ConnectorCall,
    ForgetEngine,
    GetFinished,
    ReleaseHeld,
    ReleaseUnloaded,
    RequestFinished,
    StartLoad,
)
from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnector, KVConnectorEvents, LoadOutcome
from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer
from pdlaunch.metrics.kv_transfer import count_kv_transfer_failure, observe_kv_transfer

log = logging.getLogger(__name__)

# Send a call to ranks 1..T-1; their replies in rank order (none for a call whose reply_type is None).
Mirror = Callable[[ConnectorCall], list[Any]]


def params_for_rank(params: KVTransferParams | None, rank: int, tp_size: int) -> KVTransferParams | None:
    """The kv_transfer_params decode rank `rank` uses: the side channel of the prefill rank holding its heads."""
    if not isinstance(params, PrefillAnswer):
        return params  # an unsigned push names one prefill of TP size 1 (push_params.py)
    remote_tp = params.tp_size
    ports: list[int | None] = list(params.remote_ports) if params.remote_ports else [params.remote_port]
    hosts: list[str | None] = list(params.remote_hosts) if params.remote_hosts else [params.remote_host] * len(ports)
    if remote_tp != tp_size:
        if len(set(hosts)) > 1:  # reshard.py reads every source at `remote_host`
            raise KVTransferError(f"prefill TP {remote_tp} spans nodes ({sorted(set(map(str, hosts)))}) and decode "
                                  f"TP {tp_size} differs: resharding reads every prefill rank at one address",
                                  hint="give prefill and decode the same TP size, "
                                  "or keep the prefill group on one node")
        return params  # each rank's connector plans its sources itself (kv_transfer/reshard.py)
    if len(ports) != remote_tp or len(hosts) != remote_tp:
        raise KVTransferError(f"prefill sent {len(ports)} side-channel ports and {len(hosts)} hosts for TP "
                              f"{remote_tp}", hint="run the same pdlaunch version on prefill and decode")
    update: dict[str, object] = {"remote_port": ports[rank], "remote_host": hosts[rank]}
    if params.rank_kv_checksums is not None:
        update["kv_checksum"] = params.rank_kv_checksums[rank]
    return params.model_copy(update=update)


class RankEvents:
    """Per-request reports of each rank until every rank has made the same one."""

    def __init__(self, tp_size: int) -> None:
        self.tp_size = tp_size
        self._sent: dict[str, set[int]] = {}
        self._recvd: dict[str, set[int]] = {}
        # Failed requests whose late reports from other ranks are dropped, kept while some rank may still
        # write their blocks (TPConnector._drain) and then let go (`settle`): never kept for the decode's life.
        self._failed: set[str] = set()

    def merge(self, per_rank: list[KVConnectorEvents]) -> tuple[KVConnectorEvents, set[str]]:
        """(events every rank agrees on, requests to abort on the ranks still loading them)."""
        out = KVConnectorEvents()
        to_abort: set[str] = set()
        for rank, events in enumerate(per_rank):
            for rid, error in events.failed_recving.items():
                if rid not in self._failed:
                    self._failed.add(rid)
                    self._recvd.pop(rid, None)
                    out.failed_recving[rid] = f"TP rank {rank}: {error}"
                    to_abort.add(rid)
            for rid in events.finished_recving:
                if rid not in self._failed:
                    self._recvd.setdefault(rid, set()).add(rank)
            for rid in events.finished_sending:
                self._sent.setdefault(rid, set()).add(rank)
        for table, target in ((self._recvd, out.finished_recving), (self._sent, out.finished_sending)):
            for rid in [r for r, ranks in table.items() if len(ranks) == self.tp_size]:
                del table[rid]
                target.add(rid)
        return out, to_abort

    def forget(self, request_id: str) -> None:
        self._recvd.pop(request_id, None)
        self._failed.discard(request_id)

    def abort(self, request_id: str) -> None:
        """The load was aborted on every rank: the ranks that finished it already will not be joined by the others
        (an aborted load is not reported done), so what they reported is dropped."""
        self._recvd.pop(request_id, None)

    def settle(self, draining: Iterable[str]) -> None:
        """Let go of the failed requests no rank is still loading or draining (`draining`): every rank was told to
        abort them in the round they failed, and an aborted load reports nothing more but its safe_to_free."""
        self._failed.intersection_update(draining)

    def num_tracked(self) -> int:
        """Requests some rank reported that are not settled yet (loads and sends not done on every rank, failed
        loads still draining)."""
        return len(self._sent) + len(self._recvd) + len(self._failed)


class RankLoads:
    """Each rank's outcome of a request's load (KVConnectorEvents.load_outcomes) until every rank reported one: every
    rank that started the load ends it once (done, failed, or aborted: told to stop), so a request is let go of then.
    A failure is counted at the first rank's, once per request; a load done on every rank observes the sum of their
    bytes and the slowest rank's times; one aborted, nothing (as one rank's load aborted counts nothing)."""

    def __init__(self, tp_size: int) -> None:
        self.tp_size = tp_size
        self._ends: dict[str, dict[int, LoadOutcome]] = {}

    def start(self, request_id: str) -> None:
        """A new load of `request_id`: what was left of an earlier one's is dropped."""
        self._ends.pop(request_id, None)

    def add(self, per_rank: list[KVConnectorEvents]) -> None:
        for rank, events in enumerate(per_rank):
            for rid, outcome in events.load_outcomes.items():
                ends = self._ends.setdefault(rid, {})
                if outcome.end == "failed" and all(o.end != "failed" for o in ends.values()):
                    count_kv_transfer_failure()
                ends[rank] = outcome
                if len(ends) == self.tp_size:
                    del self._ends[rid]
                    self._observe(list(ends.values()))

    @staticmethod
    def _observe(ends: list[LoadOutcome]) -> None:
        if any(o.end != "done" for o in ends):
            return
        moved = [o.xfer_seconds for o in ends if o.xfer_seconds is not None]
        observe_kv_transfer(sum(o.num_bytes for o in ends), max(o.load_seconds for o in ends),
                            max(moved) if moved else None)

    def num_tracked(self) -> int:
        """Requests some rank reported the end of its load for, and not every rank yet."""
        return len(self._ends)


class TPConnector(KVConnector):
    """Rank 0's view: `local` is rank 0's connector, `mirror` reaches the others' (executor pipes)."""

    def __init__(self, local: KVConnector, tp_size: int, mirror: Mirror, side_ports: list[int | None],
                 side_hosts: list[str | None] | None = None) -> None:
        self.local = local
        self.tp_size = tp_size
        self.mirror = mirror
        self.side_ports = side_ports  # rank r's side channel (prefill), filled as ranks register
        self.side_hosts = side_hosts or [None] * tp_size  # the address rank r advertises (its node's)
        self.events = RankEvents(tp_size)
        self.loads = RankLoads(tp_size)  # the KV transfer series of the group's loads
        self._failed_now: dict[str, str] = {}  # request_id -> why its load could not start
        # Ended loads whose blocks a transfer may still write, and on which ranks: the blocks are
        # safe to free only when every one of those ranks said so (base.py "Lifecycle contract").
        self._drain: dict[str, set[int]] = {}

    def register_kv_caches(self, spec: KVCacheSpec) -> None:
        self.local.register_kv_caches(spec)  # the other ranks registered their slices at startup
        server = getattr(self.local, "server", None)
        if server is not None:
            self.side_hosts[0], self.side_ports[0] = self.local.side_channel_address  # type: ignore[attr-defined]

    def get_num_new_matched_tokens(self, request_id: str, prompt_token_ids: list[int],
                                   kv_transfer_params: KVTransferParams | None, num_local_computed_tokens: int) -> int:
        return self.local.get_num_new_matched_tokens(request_id, prompt_token_ids, kv_transfer_params,
                                                     num_local_computed_tokens)

    def start_load(self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
                   block_ids: list[list[int]], num_local_computed_tokens: int, num_external_tokens: int) -> None:
        call = StartLoad(request_id, prompt_token_ids, kv_transfer_params, block_ids, num_local_computed_tokens,
                         num_external_tokens)
        self.events.forget(request_id)
        self.loads.start(request_id)
        try:
            params = params_for_rank(kv_transfer_params, 0, self.tp_size)
        except KVTransferError as exc:
            self._failed_now[request_id] = exc.render()  # reported by the next get_finished
            count_kv_transfer_failure()  # no rank starts its load: none reports its end
            return
        self.mirror(call)
        self.local.start_load(request_id, prompt_token_ids, params, block_ids, num_local_computed_tokens,
                              num_external_tokens)

    def request_finished(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: KVTransferParams | None, block_ids: list[list[int]]
                         ) -> tuple[bool, PrefillAnswer | None]:
        replies = self.mirror(RequestFinished(request_id, prompt_token_ids, kv_transfer_params, block_ids))
        hold, params = self.local.request_finished(request_id, prompt_token_ids, kv_transfer_params, block_ids)
        if params is not None:
            update: dict[str, object] = {"remote_ports": list(self.side_ports),
                                         "remote_hosts": [host or params.remote_host for host in self.side_hosts]}
            if params.kv_checksum is not None:  # each rank's bytes differ: decode rank r checks against rank r's
                update["rank_kv_checksums"] = [params.kv_checksum] + [
                    p.kv_checksum if p is not None else None for _, p in replies]
                update["kv_checksum"] = None
            params = params.model_copy(update=update)
        return hold, params

    def get_finished(self) -> KVConnectorEvents:
        per_rank = [self.local.get_finished(), *self.mirror(GetFinished())]
        merged, to_abort = self.events.merge(per_rank)
        self.loads.add(per_rank)
        merged.failed_recving.update(self._failed_now)
        self._failed_now.clear()
        for rank, events in enumerate(per_rank):
            for rid in events.draining:
                self._drain.setdefault(rid, set()).add(rank)
        for request_id in to_abort:
            self.abort_load(request_id)  # the other ranks stop loading; busy ones join _drain
        for rank, events in enumerate(per_rank):
            for rid in events.safe_to_free:
                ranks = self._drain.get(rid)
                if ranks is not None:
                    ranks.discard(rank)
        merged.draining = {rid for rid in merged.failed_recving if self._drain.get(rid)}
        for rid in [rid for rid, ranks in self._drain.items() if not ranks]:
            del self._drain[rid]
            if rid not in merged.failed_recving:  # freed with the failure itself otherwise
                merged.safe_to_free.add(rid)
        self.events.settle(self._drain)
        return merged

    def abort_load(self, request_id: str) -> bool:
        """True when a transfer on some rank may still write the request's blocks."""
        replies = [self.local.abort_load(request_id), *self.mirror(AbortLoad(request_id))]
        busy = {rank for rank, reply in enumerate(replies) if reply}
        self.events.abort(request_id)
        if busy:
            self._drain.setdefault(request_id, set()).update(busy)
        return bool(self._drain.get(request_id))

    def release_unloaded(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: KVTransferParams | None) -> None:
        """Every rank would have loaded its part from the prefill rank(s) holding it: each tells those (params_for_rank
        names them; params it cannot take are refused the same way on every rank, and there is nothing to tell)."""
        self.mirror(ReleaseUnloaded(request_id, prompt_token_ids, kv_transfer_params))
        try:
            params = params_for_rank(kv_transfer_params, 0, self.tp_size)
        except KVTransferError:
            return
        self.local.release_unloaded(request_id, prompt_token_ids, params)

    def release_held(self, request_id: str) -> bool:
        """Every rank holds its slice of the request's blocks: release them all (each rank reports
        finished_sending, and the request is freed when all have)."""
        replies = [*self.mirror(ReleaseHeld(request_id)), self.local.release_held(request_id)]
        return any(replies)

    def forget_engine(self, engine_id: str) -> int:
        """Every rank loaded its own agents of the dead engine: each drops them; the agents dropped on all ranks."""
        replies = self.mirror(ForgetEngine(engine_id))
        return self.local.forget_engine(engine_id) + sum(int(n) for n in replies)

    def info(self) -> dict[str, Any]:
        info = dict(self.local.info())
        info["tp_size"] = self.tp_size
        info["rank_side_channel_ports"] = list(self.side_ports) if any(self.side_ports) else None
        return info

    def shutdown(self) -> None:
        self.local.shutdown()  # the other ranks close theirs when their worker stops


def rank_connector_call(connector: KVConnector, rank: int, tp_size: int, call: ConnectorCall) -> object:
    """A mirrored scheduler-side call on rank `rank`'s own connector (worker side)."""
    match call:
        case StartLoad():
            params = params_for_rank(call.kv_transfer_params, rank, tp_size)
            connector.start_load(call.request_id, call.prompt_token_ids, params, call.block_ids,
                                 call.num_local_computed_tokens, call.num_external_tokens)
            return None
        case RequestFinished():
            return connector.request_finished(call.request_id, call.prompt_token_ids, call.kv_transfer_params,
                                              call.block_ids)
        case GetFinished():
            return connector.get_finished()
        case AbortLoad():
            return bool(connector.abort_load(call.request_id))  # None (base.py's contract) is no transfer: False
        case ReleaseUnloaded():
            try:
                params = params_for_rank(call.kv_transfer_params, rank, tp_size)
            except KVTransferError:
                return None  # rank 0 told no prefill either
            connector.release_unloaded(call.request_id, call.prompt_token_ids, params)
            return None
        case ReleaseHeld():
            return connector.release_held(call.request_id)
        case ForgetEngine():
            return connector.forget_engine(call.engine_id)
    raise TypeError(f"{type(call).__name__} is not a mirrored connector call")
