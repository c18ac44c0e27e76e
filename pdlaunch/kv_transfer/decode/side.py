"""The decode role of the NIXL connector (nixl_connector.py holds the agent and KV memory): turns a
request's kv_transfer_params into a planned load (decode/loads.py runs it), and answers the engine's
polls, aborts and sleeps. A load's blocks may have been freed under a forward still running on the device:
it marks the compute stream when it starts, and writes nothing into them before that mark completed
(decode/compute_order.py)."""

from __future__ import annotations

import logging
import time

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import ConnectorInfo, KVCacheSpec, KVConnectorEvents
from pdlaunch.kv_transfer.blocks import needed_block_indices, pair_blocks
from pdlaunch.kv_transfer.decode.compute_order import ComputeStream
from pdlaunch.kv_transfer.decode.context import LoadContext, loader_pool
from pdlaunch.kv_transfer.decode.load import Load, LoadState, Pairs
from pdlaunch.kv_transfer.decode.loads import DecodeLoads
from pdlaunch.kv_transfer.messages import Empty, ForgetRequest
from pdlaunch.kv_transfer.nixl_connector import NixlConnector
from pdlaunch.kv_transfer.notifications import Forget, PushDone, PushFailed
from pdlaunch.kv_transfer.params import (
    KVTransferParams,
    PrefillAnswer,
    UnsignedPush,
    first_token_ids,
    wants_remote_prefill,
)
from pdlaunch.kv_transfer.push_params import prompt_digest
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.reshard import ReshardPlan, plan_reshard
from pdlaunch.kv_transfer.side_channel.client import request
from pdlaunch.kv_transfer.staging import StagingArea

logger = logging.getLogger(__name__)

class DecodeSide(NixlConnector):
    def __init__(self, config: DeploymentConfig, instance: InstanceSpec, staging_bytes: int | None = None) -> None:
        super().__init__(config, instance, staging_bytes)
        kv = self.kv
        self.peers = self.peer_cache(self.agent, self._require_spec, self._device, kv.transfer_mode,
                                     kv.handshake_timeout_seconds, self.keys, self.engine_id)
        # What every load shares, built once here: loads.py and the strategies take it.
        self.ctx = LoadContext(self.agent, self._require_spec, self.peers, self.keys, kv.handshake_timeout_seconds,
                               kv.transfer_timeout_seconds, kv.verify_kv, loader_pool(self.device_index),
                               reader=self.engine_id)
        self.loads = DecodeLoads(self.ctx)
        self.releases = self.ctx.releases  # side-channel releases and cancels: never on the loader threads
        self.faults = self.loads.faults  # test only (PDLAUNCH_TEST_FAIL_TRANSFER_RATE)
        self.compute: ComputeStream | None = None  # the stream the engine's forwards run on, once registered

    @property
    def receiver(self) -> DecodeSide:
        return self

    # -- KV memory ----------------------------------------------------------------------------
    def _attach(self, spec: KVCacheSpec, staging: StagingArea | None, kv_epoch: int) -> None:
        self.ctx.staging = staging
        self.compute = ComputeStream(spec.device)
        # A rank of a TP group: rank 0 observes the group's KV transfer series (distributed/tp_connector.py).
        self.loads.table.reports_outcomes = spec.tp_size > 1

    def _drop_staging(self) -> None:
        self.ctx.staging = None

    def staging_users(self) -> set[str]:
        return self.loads.table.request_ids()

    def _forget_peers(self, kv_epoch: int) -> None:
        """Prefill engines that pushed into this decode hold UCX mappings of its staging buffer, which
        keep the buffer allocated after we free it; ask each to drop our metadata first (also one
        that went to sleep before us and so left our peer cache), then drop every prefill's metadata.
        An engine that does not answer is logged and skipped (its mapping then lives until it exits)."""
        for (host, port), engine_id in self.peers.take_pushers().items():
            try:
                request(host, port, ForgetRequest(type="forget", agent_name=self.agent.name), Empty,
                        self.kv.handshake_timeout_seconds,
                        f"asking prefill engine {engine_id} to forget this decode before sleep", self.keys)
            except KVTransferError as exc:
                logger.warning("%s; its mapping of the staging buffer stays until it exits", exc)
        self.peers.forget_all()

    def forget_engine(self, engine_id: str) -> int:
        """A prefill engine died: drop its agents (decode/peers.py), so that our mapping of its memory goes."""
        return self.peers.forget_engine(engine_id)

    # -- scheduler side -----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request_id: str, prompt_token_ids: list[int],
                                   kv_transfer_params: KVTransferParams | None, num_local_computed_tokens: int) -> int:
        if not wants_remote_prefill(kv_transfer_params):
            return 0
        # The last prompt token is recomputed locally for the first token's logits, unless the prefill
        # handed that token over (engine/first_token.py): then every prompt position is loaded.
        recompute = 0 if first_token_ids(kv_transfer_params) else 1
        return max(0, len(prompt_token_ids) - recompute - num_local_computed_tokens)

    def start_load(self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
                   block_ids: list[list[int]], num_local_computed_tokens: int, num_external_tokens: int) -> None:
        """Plan the load the params ask for and hand it to a loader thread (DecodeLoads.run); params
        that cannot be planned give a load that the next get_finished reports failed. Runs on the thread that
        launches this rank's forwards (the engine thread; a TP rank's worker between its steps), after the
        steps launched so far: the load's mark of the compute stream covers every forward that may still write
        `block_ids` (decode/compute_order.py), and nothing writes them before it completed."""
        params = kv_transfer_params
        if not isinstance(params, PrefillAnswer | UnsignedPush):
            return
        now = time.monotonic()
        load = Load(request_id, _unknown(params), [], deadline=now + self.ctx.transfer_timeout, started=now,
                    compute=self.compute.mark() if self.compute is not None else None)
        try:
            if isinstance(params, UnsignedPush):  # vLLM's push proxy: the block ids come from the prefill itself
                load.remote = RemoteKV.from_params(params)
                self._check_unsigned_push(load.remote)
                load.plan = lambda r: self._plan(prompt_token_ids, r, block_ids, num_local_computed_tokens,
                                                 num_external_tokens)
                load.prompt_digest = prompt_digest(prompt_token_ids)
            else:
                load.remote = self._required(params)
                load.pairs = self._plan(prompt_token_ids, load.remote, block_ids, num_local_computed_tokens,
                                        num_external_tokens)
                load.reshard = self._reshard_plan(load.remote)
        except KVTransferError as e:
            load.state, load.error = LoadState.FAILED, e.render()
        self.loads.table.add(load)
        if not load.state.ended:
            self.ctx.executor.submit(self.loads.run, load)
        elif isinstance(params, PrefillAnswer) and load.remote.request_id:
            # This load cannot plan the request the prefill holds for it: ask the prefill (from a release thread)
            # to free it now, not at its lease's end.
            ranks = self._held_ranks(load.remote)
            self.ctx.release_soon(load, lambda: self.loads.drop_unstarted(load, ranks))

    def release_unloaded(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: KVTransferParams | None) -> None:
        """The request ended before start_load (base.py): no load of it is in the table, so neither the table's
        abort nor a loader tells the prefill. Told here as a load that ended before its strategy was on it
        (DecodeLoads.drop_unstarted: "cancel_push" to each prefill rank that holds it for this rank), or, for params
        that name no held request (vLLM's push proxy), "drop_held" of what the load would have asked for. On a
        release thread (context.HoldReleases), never a loader thread: the side channel blocks, and a hung prefill
        would hold the threads real loads need. Past MAX_PENDING_RELEASES pending, or at shutdown, a release is
        dropped (logged): the prefill's lease frees the blocks."""
        params = kv_transfer_params
        if not isinstance(params, PrefillAnswer | UnsignedPush):
            return
        try:
            remote = RemoteKV.from_params(params)
        except KVTransferError:
            return  # names no side channel: nothing to tell (its load would have failed the same way)
        now = time.monotonic()
        load = Load(request_id, remote, [], deadline=now + self.ctx.transfer_timeout, started=now)
        load.fail("the request ended before its KV load started")
        if isinstance(params, UnsignedPush):
            load.prompt_digest = prompt_digest(prompt_token_ids)
            self.releases.submit(request_id, lambda: self.loads.drop_held(load))
        elif remote.request_id:
            ranks = self._held_ranks(remote)
            self.releases.submit(request_id, lambda: self.loads.drop_unstarted(load, ranks))

    def _required(self, params: PrefillAnswer) -> RemoteKV:
        missing = [name for name, value in (("remote_block_ids", params.remote_block_ids),
                                            ("remote_host", params.remote_host), ("remote_port", params.remote_port))
                   if value is None]
        if missing:
            raise KVTransferError(f"kv_transfer_params lack {', '.join(missing)}",
                                  hint="send decode the kv_transfer_params the prefill response carried")
        return RemoteKV.from_params(params)

    def _check_unsigned_push(self, remote: RemoteKV) -> None:
        spec = self._require_spec()
        if remote.tp_size != spec.tp_size or spec.tp_size != 1:
            raise KVTransferError(
                f"params without remote_block_ids need prefill and decode at TP size 1 (prefill "
                f"{remote.tp_size}, decode {spec.tp_size})",
                hint="send the prefill's kv_transfer_params unchanged (as vLLM's pull proxy does)")

    def _held_ranks(self, remote: RemoteKV) -> list[RemoteKV]:
        """The prefill ranks that hold `remote`'s request for this rank, before any plan: the rank it names, or
        every rank of a prefill of another TP size (each rank of this engine tells each of them; one word frees)."""
        if self.spec is None or remote.tp_size == self.spec.tp_size:
            return [remote]
        return [remote.model_copy(update={"port": port, "tp_rank": rank})
                for rank, port in enumerate(remote.rank_ports or [remote.port])]

    def _reshard_plan(self, remote: RemoteKV) -> ReshardPlan | None:
        """None when prefill has this engine's TP size (rank r reads rank r), else this rank's sources."""
        spec = self._require_spec()
        if remote.tp_size == spec.tp_size:
            return None
        return plan_reshard(remote, spec.tp_rank, spec.tp_size, spec.num_kv_heads)

    def _plan(self, prompt: list[int], remote: RemoteKV, block_ids: list[list[int]], start: int,
              count: int) -> Pairs:
        spec = self._require_spec()
        if remote.num_prompt_tokens is not None and remote.num_prompt_tokens != len(prompt):
            raise KVTransferError(
                f"the prompt has {len(prompt)} tokens here but {remote.num_prompt_tokens} on prefill engine "
                f"{remote.engine_id}", hint="send the same prompt (token ids) to prefill and decode")
        remote_ids = remote.block_ids or []
        if len(remote_ids) != len(block_ids):
            raise KVTransferError(f"prefill sent block ids of {len(remote_ids)} KV-cache groups, this engine has "
                                  f"{len(block_ids)}", hint="serve the same model on prefill and decode")
        return [
            pair_blocks(block_ids[g], remote_ids[g],
                        needed_block_indices(spec.block_size, start, count, spec.group_sliding_window[g]), g)
            for g in range(len(block_ids))
        ]

    # -- engine thread ------------------------------------------------------------------------
    def get_finished(self) -> KVConnectorEvents:
        """Loads that ended: KV loaded (finished_recving: the engine releases the request to decode),
        failed, or drained. Push loads end by notification (push_done/push_failed), pull loads by
        their READ's state (LoadTable.poll asks their strategy)."""
        if self.spec is None:
            return KVConnectorEvents()
        for notif in self._notifications():
            if isinstance(notif, PushDone | PushFailed):
                if not self.ctx.chunks.on_notif(notif):  # else one chunk of a staged push ended
                    self.loads.table.on_push_notif(notif)
            elif isinstance(notif, Forget):
                self.peers.forget_agent(notif.agent_name, notif.kv_epoch)
        now = time.monotonic()
        finished, failed = self.loads.table.poll(now)
        draining, safe = self.loads.table.poll_draining(now)
        return KVConnectorEvents(finished_recving=finished, failed_recving=failed, draining=draining,
                                 safe_to_free=safe, load_outcomes=self.loads.table.take_outcomes())

    def abort_load(self, request_id: str) -> bool:
        return self.loads.table.abort(request_id)

    def num_loading(self) -> int:
        return len(self.loads.table.running())

    def _role_info(self, info: ConnectorInfo) -> None:
        info["loading_requests"] = self.num_loading()
        info["peers"] = {eid: {"transfer_mode": r.mode, "reason": r.reason}
                         for eid, r in self.peers.snapshot().items()}

    def _resolved_mode(self) -> tuple[str, str] | None:
        first = next(iter(self.peers.snapshot().values()), None)
        return (first.mode, first.reason) if first is not None else None

    def shutdown(self) -> None:
        self.loads.shutdown()  # the loads' releases (and the queued ones: dropped), then the connections
        super().shutdown()


def _unknown(params: PrefillAnswer | UnsignedPush) -> RemoteKV:
    """What a load that fails before it starts names as its source (params that lack fields)."""
    return RemoteKV(engine_id=params.remote_engine_id, request_id=None, host=str(params.remote_host),
                    port=params.remote_port or 0)
