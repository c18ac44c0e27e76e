"""Pull: decode READs the prefill's blocks (needs NVLink between GPUs, or CPU memory).

The load first claims the prefill hold ("claim_read") so that it outlives its lease while the READ
runs; the READ carries a "read_done" notification for the prefill agent, and the engine thread polls
it. A READ seen done after the load's deadline does not count (the hold's cap may have passed).
"""

from __future__ import annotations

import logging
import time

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.blocks import coalesce, run_descriptors
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.decode.strategy import ReadsFromPrefill
from pdlaunch.kv_transfer.messages import (
    ClaimReadRequest,
    Empty,
    ReadDone,
    StageAnswer,
    StageRequest,
    UnstageRequest,
    encode_notification,
)
from pdlaunch.kv_transfer.remote_kv import RemoteKV

logger = logging.getLogger(__name__)


class PullLoad(ReadsFromPrefill):
    def __init__(self, ctx: LoadContext, remote: RemoteEngine) -> None:
        super().__init__(ctx)
        self.remote = remote

    def run(self, load: Load) -> None:
        spec, remote = self.ctx.spec(), self.remote
        local: list[tuple[int, int]] = []
        rem: list[tuple[int, int]] = []
        for g, pairs in enumerate(load.pairs):
            runs = coalesce((p[1], p[2]) for p in pairs)
            lo, ro = run_descriptors(runs, spec.kv_caches[g].data_ptr(), remote.info.base_addrs[g],
                                     spec.block_bytes[g])
            local += lo
            rem += ro
        notif = encode_notification(ReadDone(kind="read_done", request_id=load.remote.held_request_id))
        if not local:  # nothing to read (1-token prompt, full prefix hit): still let prefill free
            self.ctx.agent.notify(remote.agent_name, notif)
            with self.ctx.lock:
                if load.state == LoadState.RUNNING:
                    load.state = LoadState.OK
            return
        # Claim the prefill hold first: it then outlives its lease until our read_done/release (capped).
        claim_read(self.ctx, load, load.remote)
        xfer = self.ctx.agent.transfer("READ", local, rem, remote.agent_name, remote.info.device.index, notif)
        with self.ctx.lock:
            if load.state == LoadState.RUNNING and not load.abandoned:
                load.xfer = xfer
                return
        xfer.release()  # timed out or aborted meanwhile

    def progress(self, load: Load, now: float) -> None:
        if load.xfer is None:
            return
        xfer_state = load.xfer.state()
        if xfer_state == "DONE" and now <= load.deadline:
            load.state = LoadState.OK  # (after the deadline the prefill hold's cap may have passed)
        elif xfer_state == "ERR":
            why = f": {load.xfer.error}" if load.xfer.error else ""
            load.fail(f"NIXL READ of {load.xfer.num_bytes} bytes failed{why}")


def claim_read(ctx: LoadContext, load: Load, remote: RemoteKV) -> None:
    """Keep the prefill's hold of `remote` past its lease (capped) while this load READs its blocks."""
    remaining = ctx.remaining(load, "READ claim")
    ctx.ask(remote, ClaimReadRequest(type="claim_read", request_id=remote.held_request_id, seconds=remaining),
            Empty, remaining, "READ claim")


def read_chunk(ctx: LoadContext, load: Load, remote: RemoteEngine, source: RemoteKV, dst: list[list[int]],
               dst_bases: list[int], remote_ids: list[list[int]], block_bytes: list[int]) -> None:
    """READ remote blocks (or, from a staging prefill side, the slots it stages them in) of
    `block_bytes` per group into dst[g] slots/blocks of dst_bases[g]; waits for the READ."""
    src, ticket = remote_ids, None
    if remote.info.staging_slots:
        staged = ctx.ask(source, StageRequest(type="stage", request_id=source.held_request_id, blocks=remote_ids),
                         StageAnswer, ctx.remaining(load, "prefill staging"), "staging request")
        src, ticket = staged.slots, staged.ticket
    try:
        local: list[tuple[int, int]] = []
        rem: list[tuple[int, int]] = []
        for g in range(len(dst)):
            runs = coalesce(list(zip(dst[g], src[g])))
            lo, ro = run_descriptors(runs, dst_bases[g], remote.info.base_addrs[g], block_bytes[g])
            local += lo
            rem += ro
        if local:
            xfer = ctx.agent.transfer("READ", local, rem, remote.agent_name, remote.info.device.index, b"")
            try:
                while (state := xfer.state()) == "PROC":
                    ctx.remaining(load, "READ")
                    time.sleep(0.0002)
                if state != "DONE":
                    raise KVTransferError(f"NIXL READ of {xfer.num_bytes} bytes failed")
            finally:
                xfer.release()
    finally:
        if ticket is not None:
            try:
                ctx.ask(source, UnstageRequest(type="unstage", ticket=ticket), Empty, ctx.handshake_timeout,
                        "unstage request")
            except KVTransferError as e:  # the prefill side frees the slots at the ticket deadline
                logger.warning("%s", e)
