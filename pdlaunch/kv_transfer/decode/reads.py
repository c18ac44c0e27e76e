"""READs of a prefill's KV by a decode load (pull, staged pull, resharding), on its loader thread: the methods of
`LoadContext` (decode/context.py, their one subclass) that claim the prefill's hold past its lease while a READ
runs, READ one chunk straight from the prefill's blocks or through its staging slots, post a READ (listed on the
load first, so that an abort drains it: decode/table.py), and wait for a READ the loader stops polling.

A READ counts only when seen done before the load's deadline: the prefill's claim (or staging ticket) outlives
that deadline only by a margin, then its blocks (slots) serve others.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.auth import SideChannelKeys
from pdlaunch.kv_transfer.blocks import coalesce, run_descriptors
from pdlaunch.kv_transfer.decode.answer_checks import check_staged
from pdlaunch.kv_transfer.decode.compute_order import wait_compute
from pdlaunch.kv_transfer.decode.load import Load, LoadState
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.messages import (
    ClaimReadRequest,
    Empty,
    SideChannelRequest,
    StageAnswer,
    StageRequest,
    UnstageRequest,
)
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.side_channel import client
from pdlaunch.kv_transfer.side_channel.client import Connections, Reply
from pdlaunch.kv_transfer.transport import TransferAgent, Xfer

logger = logging.getLogger("pdlaunch.kv_transfer.decode.context")  # the context's one logger name, across its files

# A loader's READ still running after its load's deadline or abort gets this long to end: as long as
# the table drains a load past its deadline (table.py DRAIN_GRACE_SECONDS).
READ_END_WAIT_SECONDS = 5.0


class LoadReads:
    """The READ calls of `LoadContext` (its base)."""

    # The context's parts these methods use; LoadContext (a dataclass) holds them.
    agent: TransferAgent
    keys: SideChannelKeys
    handshake_timeout: float
    reader: str
    lock: threading.Lock
    connections: Connections

    if TYPE_CHECKING:  # LoadContext's
        def remaining(self, load: Load, what: str) -> float: ...

        def ask(self, remote: RemoteKV, message: SideChannelRequest, reply: type[Reply], timeout: float,
                what: str) -> Reply: ...

    def claim_read(self, load: Load, remote: RemoteKV) -> None:
        """Keep the prefill's hold of `remote` past its lease (capped) while this load READs its blocks."""
        self.send_claim_read(load, remote).answer(Empty)

    def send_claim_read(self, load: Load, remote: RemoteKV) -> client.PendingCall:
        """`claim_read`, sent now; the claim holds once its answer is read (`PendingCall.answer(Empty)`)."""
        remaining = self.remaining(load, "READ claim")
        message = ClaimReadRequest(type="claim_read", request_id=remote.held_request_id, seconds=remaining,
                                   reader=self.reader, load=load.load_id)
        return client.send(remote.host, remote.port, message, remaining, f"READ claim to {remote.where}",
                           self.keys, self.connections)

    def read_chunk(self, load: Load, remote: RemoteEngine, source: RemoteKV, dst: list[list[int]],
                   dst_bases: list[int], remote_ids: list[list[int]], block_bytes: list[int], *,
                   into_blocks: bool = True) -> None:
        """READ remote blocks (or, from a staging prefill side, the slots it stages them in) of
        `block_bytes` per group into dst[g] slots/blocks of dst_bases[g] (`into_blocks`: the load's blocks);
        waits for the READ, which counts only when seen done before the load's deadline."""
        src, ticket = remote_ids, None
        if remote.info.staging_slots:
            # Each stage claims the hold for us (as claim_read does) until our read_done/release.
            remaining = self.remaining(load, "prefill staging")
            staged = self.ask(source, StageRequest(type="stage", request_id=source.held_request_id,
                                                   blocks=remote_ids, nonce=uuid.uuid4().hex, reader=self.reader,
                                                   load=load.load_id, seconds=remaining),
                              StageAnswer, remaining, "staging request")
            src, ticket = staged.slots, staged.ticket
        try:
            if ticket is not None:
                check_staged(staged.slots, remote_ids, remote.info.staging_slots, source, load.request_id)
            local: list[tuple[int, int]] = []
            rem: list[tuple[int, int]] = []
            for g in range(len(dst)):
                runs = coalesce(list(zip(dst[g], src[g])))
                lo, ro = run_descriptors(runs, dst_bases[g], remote.info.base_addrs[g], block_bytes[g])
                local += lo
                rem += ro
            if local:
                xfer = self.post_read(load, local, rem, remote.agent_name, remote.info.device.index, b"",
                                      into_blocks=into_blocks)
                try:
                    while (state := xfer.state()) == "PROC":
                        self.remaining(load, "READ")
                        time.sleep(0.0002)
                    if state != "DONE":
                        why = f": {xfer.error}" if xfer.error else ""
                        raise KVTransferError(f"READ of {xfer.num_bytes} bytes failed{why}")
                    # Seen done after our deadline, it does not count (as pull.py): the prefill's staging ticket
                    # (or READ claim) outlives the deadline only by a margin, then its slots (blocks) serve others.
                    self.remaining(load, "READ")
                finally:
                    self._end_read(load, xfer)
        finally:
            if ticket is not None:
                try:
                    self.ask(source, UnstageRequest(type="unstage", ticket=ticket), Empty, self.handshake_timeout,
                             "unstage request")
                except KVTransferError as e:  # the prefill side frees the slots at the ticket deadline
                    logger.warning("%s", e)

    def post_read(self, load: Load, local: list[tuple[int, int]], rem: list[tuple[int, int]], agent_name: str,
                  device_index: int, notif: bytes, *, into_blocks: bool = True) -> Xfer:
        """Post a READ into the load's blocks (after wait_compute) or slots, listed on the load from before the
        post: an abort or failure that lands while the post runs drains it like a posted READ (decode/table.py)."""
        if into_blocks:
            wait_compute(load, self.remaining)
        with self.lock:
            if load.abandoned or load.state != LoadState.RUNNING:
                raise KVTransferError(f"READ of request {load.request_id} not posted: {load.error or 'aborted'}")
            load.read_posting = True
            if load.posted is None:
                load.posted = time.monotonic()
        try:
            xfer = self.agent.transfer("READ", local, rem, agent_name, device_index, notif)
        except BaseException:
            with self.lock:
                load.read_posting = False
            raise
        with self.lock:
            listed, load.read_posting = load.read_posting, False
            if listed:
                load.xfer = xfer
        if not listed:  # the load's drain ran out while the post ran: no one else releases the READ
            xfer.release()
            raise KVTransferError(f"READ of request {load.request_id} posted after its load was given up")
        return xfer

    def _end_read(self, load: Load, xfer: Xfer) -> None:
        """The loader stops polling its READ: wait while it still runs (its slots go back to the caller
        after this), as long as the load's drain where releasing the READ cancels it (NIXL), else until it
        ended (Mooncake: its own transfer timeout bounds the wait; until then the READ writes the slots,
        and the load's blocks stay with the table's drain)."""
        until = max(time.monotonic(), load.deadline) + READ_END_WAIT_SECONDS
        while (state := xfer.state()) == "PROC" and time.monotonic() < until:
            time.sleep(0.001)
        if state == "PROC" and not self.agent.release_cancels:
            logger.warning("request %s: a READ of %d bytes still runs %.0fs after its load's deadline or abort and "
                           "this transport cannot cancel it; its staging slots and blocks stay held until it ends "
                           "(at the latest at Mooncake's transfer timeout: MC_TRANSFER_TIMEOUT plus 1 s per GB it "
                           "moves)", load.request_id, xfer.num_bytes, READ_END_WAIT_SECONDS)
            while xfer.state() == "PROC":
                time.sleep(0.01)
        elif state == "PROC":
            logger.error("request %s: a READ of %d bytes still runs %.0fs after its load's deadline or abort",
                         load.request_id, xfer.num_bytes, READ_END_WAIT_SECONDS)
        with self.lock:
            mine = load.xfer is xfer  # else the table's drain ended and released it
            if mine:
                load.xfer = None
        if mine:
            xfer.release()

