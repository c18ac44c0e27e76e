"""The decode side of a resharding load (plan: reshard.py): READ whole prefill blocks into staging
slots shaped like a prefill block, verify them, copy this rank's head slices into its own blocks.

Runs on a loader thread of DecodeSide (nixl_receiver.py). Each source prefill rank gets exactly one
notification per request from this rank: read_done after its blocks were read, release when the
load failed or was aborted (each names `readers`, so the prefill rank frees after the last one).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

import torch

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer import side_channel
from pdlaunch.kv_transfer.agent import KVAgent, encode_notif
from pdlaunch.kv_transfer.auth import SideChannelKeys
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.blocks import coalesce
from pdlaunch.kv_transfer.checksum import verify_blocks
from pdlaunch.kv_transfer.load import Load
from pdlaunch.kv_transfer.peers import PeerCache, RemoteEngine
from pdlaunch.kv_transfer.reshard import HeadSlice, ReshardPlan, Source
from pdlaunch.kv_transfer.staging import StagingArea

logger = logging.getLogger(__name__)

RESHARD_STAGING_BYTES = 256 << 20  # per prefill head split; 256 slots of a 1 MiB block, larger loads are chunked


class ReshardStaging:
    """Staging areas shaped like a block of a prefill rank, one per KV-heads-per-rank value, allocated
    and registered with NIXL on first use (plain memory, outside any CuMem pool)."""

    def __init__(self, agent: KVAgent, budget_bytes: int = RESHARD_STAGING_BYTES) -> None:
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


class ReshardingSide(Protocol):
    """What a resharding load uses of the decode side (nixl_receiver.py's DecodeSide is one): a
    protocol, so that this module does not import nixl_receiver.py back."""

    agent: KVAgent
    keys: SideChannelKeys
    peers: PeerCache
    verify_kv: bool
    reshard_staging: ReshardStaging
    _lock: threading.Lock
    _spec: Callable[[], KVCacheSpec]

    def _remaining(self, load: Load, what: str) -> float: ...

    def _read_chunk(self, load: Load, remote: RemoteEngine, host: str, port: int, dst: list[list[int]],
                    dst_bases: list[int], remote_ids: list[list[int]], block_bytes: list[int]) -> None: ...


def run_resharded_load(side: ReshardingSide, load: Load, plan: ReshardPlan) -> None:
    """The whole load; raises KVTransferError on failure (the caller fails the request)."""
    spec = side._spec()
    request_id = load.params["remote_request_id"]
    remotes: dict[int, RemoteEngine] = {}
    notified: set[int] = set()
    try:
        for src in plan.sources:
            remotes[src.rank] = remote = side.peers.get(src.params)
            _check_source(src, remote, plan, spec)
        reading = [src for src in plan.sources if src.slices]
        moved = any(load.pairs)
        if side.verify_kv and moved and any(src.checksums is None for src in reading):
            raise KVTransferError(
                f"request {load.request_id}: kv_transfer.verify_kv is on here but {load.where} sent no kv_checksum",
                field="kv_transfer.verify_kv", hint="turn verify_kv on for the prefill instances too")
        with side._lock:
            if load.abandoned or load.state != "handshake":
                return
            load.mode = "pull"
            load.num_bytes = sum(len(pairs) * remotes[src.rank].info.block_bytes[g]
                                 for src in reading for g, pairs in enumerate(load.pairs))
            load.state = "staging"
        area = side.reshard_staging.get(spec.kv_caches, plan.remote_heads) if moved else None
        for src in plan.sources:
            if src.slices and area is not None:
                _read_source(side, load, src, remotes[src.rank], area, spec)
            side.agent.notify(remotes[src.rank].agent_name,
                              encode_notif("read_done", request_id=request_id, readers=src.readers))
            notified.add(src.rank)
        with side._lock:
            if load.state == "staging":
                load.state = "ok"
    finally:
        for rank, remote in remotes.items():
            if rank not in notified:
                try:  # best effort: otherwise that prefill rank frees at lease expiry
                    readers = next(s.readers for s in plan.sources if s.rank == rank)
                    release = encode_notif("release", request_id=request_id, readers=readers)
                    side.agent.notify(remote.agent_name, release)
                except Exception as e:
                    logger.debug("could not tell prefill rank %d to release request %s: %s", rank, request_id, e)


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


def _read_source(side: ReshardingSide, load: Load, src: Source, remote: RemoteEngine, area: StagingArea,
                 spec: KVCacheSpec) -> None:
    """Chunks of at most the slot count: READ remote blocks into slots, verify, copy the head slices."""
    host, port = str(src.params["remote_host"]), int(src.params["remote_port"])
    if not remote.info.staging_slots:  # READs its blocks directly: keep them held past the lease (capped)
        remaining = side._remaining(load, "READ claim")
        side_channel.call(host, port, {"type": "claim_read", "request_id": src.params["remote_request_id"],
                                       "seconds": remaining}, remaining, f"READ claim to prefill rank {src.rank}",
                          side.keys)
    chunk = min(c for c in (area.num_slots, remote.info.staging_slots) if c)
    longest = max((len(group) for group in load.pairs), default=0)
    bases = [b.data_ptr() for b in area.buffers]
    for start in range(0, longest, chunk):
        part = [group[start:start + chunk] for group in load.pairs]
        slots = area.acquire(max(map(len, part)), side._remaining(load, "resharding staging slots"))
        try:
            dst = [slots[:len(group)] for group in part]
            side._read_chunk(load, remote, host, port, dst, bases, [[x[2] for x in g] for g in part],
                             remote.info.block_bytes)
            if src.checksums is not None:  # digests of whole prefill blocks, checked before slicing
                for g, group in enumerate(part):
                    verify_blocks(area.buffers[g], g, dst[g], [src.checksums[g][x[0]] for x in group],
                                  load.request_id)
            with side._lock:  # never write into blocks the engine freed after a timeout or abort
                if load.state != "staging" or load.abandoned:
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
