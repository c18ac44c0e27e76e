"""Pull: decode READs the prefill's blocks (needs NVLink between GPUs, or CPU memory).

The load claims the prefill hold ("claim_read") so that it outlives its lease while the READ runs. The
READ is posted first and the claim sent right after it, its answer read last, so the claim's round trip
overlaps the READ (it used to precede it: ~0.3 ms of a 0.75 ms small pull on CPU) and its send no longer
delays the post (~0.27 ms on this 2-core machine's probe, benchmarks/kv_probe). Safety does not depend on
the order: the READ counts only once the claim was answered, and an answer of "held" means the hold lived
from the prompt's end (before this load started) to the claim, and is kept from then until our
read_done/release (a claim served after the READ's read_done is answered as held: prefill/holds.py); a
refused claim (the lease had expired) fails the load whatever the READ read, and the table drains the READ
before the blocks go back. The
READ carries a "read_done" notification for the prefill agent, and the engine thread polls it. A READ
seen done after the load's deadline does not count (the hold's cap may have passed). A read_done is
best effort, as every notification to the prefill (decode/context.py): one that is lost costs the prefill
its blocks until its lease ends, never the load. The READ is posted once the forwards the engine launched
before the load ended (decode/compute_order.py): one of them may still write a block it lands in.
"""

from __future__ import annotations

from pdlaunch.kv_transfer.blocks import coalesce, run_descriptors
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState, LoadStrategy
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.messages import Empty
from pdlaunch.kv_transfer.notifications import ReadDone, encode_notification


class PullLoad(LoadStrategy):
    mode = "pull"

    def __init__(self, ctx: LoadContext, remote: RemoteEngine) -> None:
        self.ctx = ctx
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
        done = ReadDone(kind="read_done", request_id=load.remote.held_request_id, reader=self.ctx.reader,
                        load=load.load_id)
        if not local:  # nothing to read (1-token prompt, full prefix hit): still let prefill free
            self.ctx.notify_prefill(remote.agent_name, done, load.request_id)
            with self.ctx.lock:
                if load.state == LoadState.RUNNING:
                    load.state = LoadState.OK
            return
        # The READ goes first; the claim, sent while it runs, keeps the prefill hold past its lease until our
        # read_done/release (capped), and the READ counts only once the claim is answered.
        self.ctx.post_read(load, local, rem, remote.agent_name, remote.info.device.index,
                           encode_notification(done), into_blocks=True)
        claim = self.ctx.send_claim_read(load, load.remote)
        claim.answer(Empty)  # refused: KVTransferError fails the load (the table drains a READ still running)
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
            load.fail(f"READ of {load.xfer.num_bytes} bytes failed{why}")

    def release_prefill(self, load: Load) -> None:
        self.ctx.release_prefill(load)

