"""The decode side of a resharding load (plan: reshard.py): READ whole prefill blocks into staging
slots shaped like a prefill block, verify them, copy this rank's head slices into its own blocks.

A pull-only strategy (chosen in decode/loads.py), since a rank needs whole prefill blocks. The READs land
in the staging slots; the copy into the blocks waits for the forwards the engine launched before the load
(decode/compute_order.py).
"""

from __future__ import annotations

import logging
import threading
from functools import partial

import torch

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.blocks import coalesce
from pdlaunch.kv_transfer.checksum import verify_blocks
from pdlaunch.kv_transfer.decode.answer_checks import check_block_ids, check_digests
from pdlaunch.kv_transfer.decode.compute_order import wait_compute
from pdlaunch.kv_transfer.decode.context import LOADER_DEADLINE_GRACE_SECONDS, LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState, LoadStrategy
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.notifications import ReadDone
from pdlaunch.kv_transfer.reshard import HeadSlice, ReshardPlan, Source
from pdlaunch.kv_transfer.staging import StagingArea
from pdlaunch.kv_transfer.transport import TransferAgent

logger = logging.getLogger(__name__)

RESHARD_STAGING_BYTES = 256 << 20  # per prefill head split; 256 slots of a 1 MiB block, larger loads are chunked


class ReshardStaging:
    """Staging areas shaped like a block of a prefill rank, one per KV-heads-per-rank value, allocated
    and registered with NIXL on first use (plain memory, outside any CuMem pool)."""

    def __init__(self, agent: TransferAgent, budget_bytes: int = RESHARD_STAGING_BYTES) -> None:
        self.agent = agent
        self.budget_bytes = budget_bytes
        self._areas: dict[int, StagingArea] = {}
        self._lock = threading.Lock()

    def get(self, kv_caches: list[torch.Tensor], kv_heads: int) -> StagingArea:
        with self._lock:
            area = self._areas.get(kv_heads)
            if area is None:
                area = StagingArea(kv_caches, self.budget_bytes, kv_heads=kv_heads)
                self.agent.register_extra(area.buffers)
                self._areas[kv_heads] = area
                logger.info("KV resharding staging for prefill blocks of %d KV heads: %d slots (%.1f MiB)",
                            kv_heads, area.num_slots, area.nbytes / 2**20)
            return area


class ReshardLoad(LoadStrategy):
    """Each source prefill rank gets exactly one notification per request from this rank: read_done
    after its blocks were read, release when the load failed or was aborted (each names `readers`,
    so the prefill rank frees after the last one); both best effort (decode/context.py): a lost one
    costs that rank its blocks until its lease ends. A rank whose handshake failed, or was not tried (an
    earlier rank's failed), gets its release on its side channel, without a handshake. A handshake gives up once the
    load ended or was aborted (decode/peers.py), as a load without resharding's does: an aborted load used to wait
    it out, up to the handshake timeout per source rank. It enforces the deadline in its loader thread."""

    mode = "pull"
    deadline_grace = LOADER_DEADLINE_GRACE_SECONDS

    def __init__(self, ctx: LoadContext, staging: ReshardStaging, plan: ReshardPlan) -> None:
        self.ctx = ctx
        self.staging = staging
        self.plan = plan

    def run(self, load: Load) -> None:
        """The whole load, from the handshake with every source rank on (the load is still HANDSHAKE);
        raises KVTransferError on failure (the caller fails the request)."""
        ctx, plan, spec = self.ctx, self.plan, self.ctx.spec()
        remotes: dict[int, RemoteEngine] = {}
        notified: set[int] = set()
        try:
            for src in plan.sources:
                remotes[src.rank] = ctx.peers.get(src.remote, stopped=load.stopped)
                _check_source(src, remotes[src.rank], plan, spec)
                check_block_ids(load, remotes[src.rank], src.remote.where)
                if src.slices:  # _read_source verifies what it READs against them
                    check_digests(load, src.checksums, f"{src.remote.where} (TP rank {src.rank})")
            reading = [src for src in plan.sources if src.slices]
            moved = any(load.pairs)
            if ctx.verify_kv and moved and any(src.checksums is None for src in reading):
                raise KVTransferError(
                    f"request {load.request_id}: kv_transfer.verify_kv is on here but {load.where} sent no "
                    "kv_checksum", field="kv_transfer.verify_kv",
                    hint="turn verify_kv on for the prefill instances too")
            with ctx.lock:
                if load.abandoned or load.state != LoadState.HANDSHAKE:
                    return
                load.state = LoadState.RUNNING
                load.num_bytes = sum(len(pairs) * remotes[src.rank].info.block_bytes[g]
                                     for src in reading for g, pairs in enumerate(load.pairs))
            area = self.staging.get(spec.kv_caches, plan.remote_heads) if moved else None
            for src in plan.sources:
                if src.slices and area is not None:
                    _read_source(ctx, load, src, remotes[src.rank], area, spec)
                notified.add(src.rank)  # its one notification, sent or lost: no release follows it
                ctx.notify_prefill(remotes[src.rank].agent_name, ReadDone(
                    kind="read_done", request_id=load.remote.held_request_id, reader=ctx.reader, load=load.load_id,
                    readers=src.readers), load.request_id)
            with ctx.lock:
                if load.state == LoadState.RUNNING:
                    load.state = LoadState.OK
        finally:
            for src in plan.sources:
                if src.rank not in notified:
                    self._release(load, src, remotes.get(src.rank))

    def _release(self, load: Load, src: Source, remote: RemoteEngine | None) -> None:
        """Best effort: send source rank `src` its release: a NIXL notification to the agent this load shook hands
        with (`remote`); without one (its handshake failed, or was not tried) on the rank's side channel, which needs
        no handshake (LoadContext.send_release: no second handshake with a rank that may just have left the first
        unanswered, which kept this loader thread up to the handshake timeout), on a release thread
        (LoadContext.release_soon): that rank may not answer it either."""
        ctx = self.ctx
        if remote is None:  # on the release threads: this loader thread is the next load's
            ctx.release_soon(load, partial(ctx.send_release, load, src.remote, src.readers))
            return
        ctx.notify_prefill(remote.agent_name, ReadDone(kind="release", request_id=load.remote.held_request_id,
                                                       reader=ctx.reader, load=load.load_id, readers=src.readers),
                          load.request_id)


def _check_source(src: Source, remote: RemoteEngine, plan: ReshardPlan, spec: KVCacheSpec) -> None:
    info = remote.info
    if info.tp_size != plan.remote_tp or info.num_kv_heads != plan.remote_heads:
        raise KVTransferError(
            f"prefill rank {src.rank} reports TP {info.tp_size} with {info.num_kv_heads} KV heads per rank, the "
            f"request's params said TP {plan.remote_tp} with {plan.remote_heads}",
            hint="run the same pdlaunch version on prefill and decode")
    if src.slices and remote.mode != "pull":
        raise KVTransferError(
            f"KV resharding from prefill TP {plan.remote_tp} to decode TP {spec.tp_size} reads whole prefill blocks "
            f"(pull), but the transfer with prefill engine {info.engine_id} resolved to push: {remote.reason}",
            field="kv_transfer.transfer_mode",
            hint="use transfer_mode pull/auto where decode can READ (CPU, GPUs joined by NVLink), or the same "
            "TP size for prefill and decode")


def _read_source(ctx: LoadContext, load: Load, src: Source, remote: RemoteEngine, area: StagingArea,
                 spec: KVCacheSpec) -> None:
    """Chunks of at most the slot count: READ remote blocks into slots, verify, copy the head slices."""
    # Keep the rank's blocks held past the lease (capped) until our notification: a READ of its blocks claims
    # them first, one of its staging slots with each stage request (read_chunk).
    if not remote.info.staging_slots:
        ctx.claim_read(load, src.remote)
    chunk = min(c for c in (area.num_slots, remote.info.staging_slots) if c)
    longest = max((len(group) for group in load.pairs), default=0)
    bases = [b.data_ptr() for b in area.buffers]
    for start in range(0, longest, chunk):
        part = [group[start:start + chunk] for group in load.pairs]
        slots = area.acquire(max(map(len, part)), ctx.remaining(load, "resharding staging slots"))
        try:
            dst = [slots[:len(group)] for group in part]
            ctx.read_chunk(load, remote, src.remote, dst, bases, [[x[2] for x in g] for g in part],
                           remote.info.block_bytes, into_blocks=False)
            if src.checksums is not None:  # digests of whole prefill blocks, checked before slicing
                for g, group in enumerate(part):
                    verify_blocks(area.buffers[g], g, dst[g], [src.checksums[g][x[0]] for x in group],
                                  load.request_id)
            wait_compute(load, ctx.remaining)  # the forwards launched before the load ended
            with ctx.lock:  # never write into blocks the engine freed after a timeout or abort
                if load.state != LoadState.RUNNING or load.abandoned:
                    raise KVTransferError(f"KV load of request {load.request_id} was aborted")
                copy_head_slices(spec.kv_caches, area, [[x[1] for x in g] for g in part], dst, src.slices)
        finally:
            area.release(slots)


def copy_head_slices(kv_caches: list[torch.Tensor], area: StagingArea, block_ids: list[list[int]],
                     slots: list[list[int]], slices: list[HeadSlice]) -> None:
    """kv_caches[g][block, ..., dst heads, :] = area.buffers[g][slot, ..., src heads, :] per slice.

    Both are [n, layers, 2, block_size, heads, head_dim]; one strided copy per run of consecutive ids.
    """
    for g, ids in enumerate(block_ids):
        for run in coalesce(list(zip(ids, slots[g]))):
            local = kv_caches[g][run.local_start:run.local_start + run.count]
            staged = area.buffers[g][run.remote_start:run.remote_start + run.count]
            for s in slices:
                local[:, :, :, :, s.dst_head:s.dst_head + s.count].copy_(
                    staged[:, :, :, :, s.src_head:s.src_head + s.count])
    if area.device.type == "cuda":
        torch.cuda.current_stream(area.device).synchronize()
