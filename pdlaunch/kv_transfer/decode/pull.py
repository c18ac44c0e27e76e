"""Pull: decode READs the prefill's blocks (needs NVLink between GPUs, or CPU memory).

The load claims the prefill hold ("claim_read") so that it outlives its lease while the READ runs. The
claim goes out as the READ is posted: from a loader thread, sent just before the READ is posted and its
answer read after; when the handshake is cached, the engine thread posts the READ (DecodeLoads.start) while
a loader thread sends the claim, so neither the hop to a loader thread nor the claim's signing and sending
delays the READ. The READ counts only once the claim was answered, and a refused claim (the lease had
expired) fails the load whatever the READ read. A claim served after the READ's "read_done" notification
is answered as claimed (prefill/holds.py: the hold lived until that notification). The engine thread
polls the READ. A READ seen done after the load's deadline does not count (the hold's cap may have passed).
"""

from __future__ import annotations

from typing import NamedTuple

from pdlaunch.kv_transfer.blocks import coalesce, run_descriptors
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState, LoadStrategy
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.messages import Empty, ReadDone, encode_notification
from pdlaunch.kv_transfer.side_channel import PendingCall


class Read(NamedTuple):
    """One READ: (address, length) descriptors on both sides, and the read_done notification it carries."""

    local: list[tuple[int, int]]
    remote: list[tuple[int, int]]
    notif: bytes


class PullLoad(LoadStrategy):
    mode = "pull"

    def __init__(self, ctx: LoadContext, remote: RemoteEngine) -> None:
        self.ctx = ctx
        self.remote = remote

    def run(self, load: Load) -> None:
        """Loader thread: the claim sent, the READ posted while it travels, then its answer read."""
        read = self.prepare(load)
        if read is None:
            return
        claim = self.ctx.send_claim_read(load, load.remote)
        try:
            posted = self.post(load, read)
        except BaseException:
            claim.close()
            raise
        if not posted:
            claim.close()
            return
        self._claimed(load, claim)

    def prepare(self, load: Load) -> Read | None:
        """The READ's descriptors and notification; None when there is nothing to read (1-token prompt,
        full prefix hit): the prefill is told it may free, and the load is done."""
        spec, remote = self.ctx.spec(), self.remote
        local: list[tuple[int, int]] = []
        rem: list[tuple[int, int]] = []
        for g, pairs in enumerate(load.pairs):
            runs = coalesce((p[1], p[2]) for p in pairs)
            lo, ro = run_descriptors(runs, spec.kv_caches[g].data_ptr(), remote.info.base_addrs[g],
                                     spec.block_bytes[g])
            local += lo
            rem += ro
        notif = encode_notification(ReadDone(kind="read_done", request_id=load.remote.held_request_id,
                                             reader=self.ctx.reader))
        if not local:
            self.ctx.agent.notify(remote.agent_name, notif)
            with self.ctx.lock:
                if load.state == LoadState.RUNNING:
                    load.state = LoadState.OK
            return None
        return Read(local, rem, notif)

    def post(self, load: Load, read: Read) -> bool:
        """Post the READ (the loader thread, or the engine thread: DecodeLoads.start); False when the load
        ended meanwhile (timed out or aborted: the READ is released)."""
        remote = self.remote
        xfer = self.ctx.agent.transfer("READ", read.local, read.remote, remote.agent_name,
                                       remote.info.device.index, read.notif)
        with self.ctx.lock:
            posted = load.state == LoadState.RUNNING and not load.abandoned
            if posted:
                load.xfer = xfer
        if not posted:
            xfer.release()
        return posted

    def claim(self, load: Load) -> None:
        """Loader thread: the claim sent and answered (DecodeLoads.start sends it beside a READ the engine
        thread posts)."""
        self._claimed(load, self.ctx.send_claim_read(load, load.remote))

    def _claimed(self, load: Load, claim: PendingCall) -> None:
        claim.answer(Empty)  # refused or lost: KVTransferError fails the load (the table drains the READ)
        with self.ctx.lock:
            load.read_claimed = True

    def progress(self, load: Load, now: float) -> None:
        if load.xfer is None:
            return
        xfer_state = load.xfer.state()
        if xfer_state == "DONE" and load.read_claimed and now <= load.deadline:
            load.state = LoadState.OK  # (after the deadline the prefill hold's cap may have passed)
        elif xfer_state == "ERR":
            why = f": {load.xfer.error}" if load.xfer.error else ""
            load.fail(f"NIXL READ of {load.xfer.num_bytes} bytes failed{why}")

    def release_prefill(self, load: Load) -> None:
        self.ctx.release_prefill(load)

