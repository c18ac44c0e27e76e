"""Staged: KV goes through a staging buffer on either side (staging.py: plain memory outside the CuMem
pools that NIXL can reach). The loader thread runs the whole load in chunks of at most the smaller
slot count: (prefill stages, decode READs, unstage) or (prefill stages and WRITEs into decode's
slots), then decode copies its slots into its blocks. It enforces the deadline itself. A pull keeps
the prefill hold (past its lease, capped) until its read_done/release, as a direct pull does (pull.py):
one that READs the prefill's blocks themselves (only decode stages) claims it first ("claim_read"), one
through the prefill's staging slots claims it with each stage request (its reader travels with it), so
another decode's end between two chunks does not end the hold. The read_done after the last chunk is best
effort (decode/context.py): the load completes without it. Nothing writes the load's blocks (a chunk's READ or
WRITE straight into them, or the scatter out of this side's slots) before the forwards the engine launched
before the load ended (decode/compute_order.py); a READ or WRITE into slots need not wait.
"""

from __future__ import annotations

from functools import partial

from pdlaunch.kv_transfer.decode.compute_order import wait_compute
from pdlaunch.kv_transfer.decode.context import LOADER_DEADLINE_GRACE_SECONDS, LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState, LoadStrategy
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.notifications import ReadDone


class StagedLoad(LoadStrategy):
    deadline_grace = LOADER_DEADLINE_GRACE_SECONDS

    def __init__(self, ctx: LoadContext, remote: RemoteEngine) -> None:
        self.ctx = ctx
        self.remote = remote
        self.mode = remote.mode  # the chunks are READ (pull) or WRITten by the prefill (push)

    def release_prefill(self, load: Load) -> None:
        if self.mode == "pull":
            self.ctx.release_prefill(load)

    def cancel_unsent(self, load: Load) -> None:
        if self.mode == "push":  # no chunk's WRITE runs (else the load drains), but the prefill may still hold it
            self.ctx.release_soon(load, lambda: self.ctx.cancel_push(load))

    def cancel(self, load: Load) -> None:
        if self.mode == "push":
            self.ctx.cancel_push(load)

    def run(self, load: Load) -> None:
        """The whole load in chunks through staging slots (this side's, the prefill side's, or both)."""
        ctx, staging, spec, remote = self.ctx, self.ctx.staging, self.ctx.spec(), self.remote
        chunk = min(c for c in (staging.num_slots if staging else 0, remote.info.staging_slots) if c)
        longest = max((len(g) for g in load.pairs), default=0)
        dst_bases = [b.data_ptr() for b in (staging.buffers if staging else spec.kv_caches)]
        if self.mode == "pull" and longest and not remote.info.staging_slots:
            # READs of the prefill's own blocks, chunk after chunk: keep them held past the lease (capped)
            # until our read_done/release, as a direct pull does (through its staging slots, each stage claims).
            ctx.claim_read(load, load.remote)
        for start in range(0, longest, chunk):
            part = [group[start:start + chunk] for group in load.pairs]
            local_ids = [[x[1] for x in group] for group in part]
            remote_ids = [[x[2] for x in group] for group in part]
            slots: list[int] = []
            if staging is not None:
                slots = staging.acquire(max(map(len, local_ids)), ctx.remaining(load, "staging slots"))
            try:
                dst = [slots[:len(ids)] for ids in local_ids] if staging is not None else local_ids
                direct = staging is None  # the chunk lands in the load's blocks themselves
                if self.mode == "pull":
                    ctx.read_chunk(load, remote, load.remote, dst, dst_bases, remote_ids, spec.block_bytes,
                                   into_blocks=direct)
                else:
                    pairs = [list(zip(dst[g], remote_ids[g])) for g in range(len(dst))]
                    release = partial(staging.release, slots) if staging is not None and slots else None
                    try:
                        ctx.request_push(load, dst_bases, pairs, spec, last=start + chunk >= longest, wait=True,
                                         release=release, into_blocks=direct)
                    except BaseException:
                        slots = []  # request_push frees them, once no WRITE of the chunk can land in them
                        raise
                if staging is not None:
                    wait_compute(load, ctx.remaining)  # the forwards launched before the load ended
                    with ctx.lock:  # never write into blocks the engine freed after a timeout or abort
                        if load.state != LoadState.RUNNING or load.abandoned:
                            return
                        staging.scatter(spec.kv_caches, local_ids, slots)
            finally:
                if slots and staging is not None:
                    staging.release(slots)
        if self.mode == "pull" or longest == 0:
            ctx.notify_prefill(remote.agent_name, ReadDone(kind="read_done", request_id=load.remote.held_request_id,
                                                           reader=ctx.reader, load=load.load_id), load.request_id)
        with ctx.lock:
            if load.state == LoadState.RUNNING:
                load.state = LoadState.OK
