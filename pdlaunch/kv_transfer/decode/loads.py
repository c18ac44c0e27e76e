"""The loads of the decode side: each one planned on the engine thread (decode/side.py `start_load`),
run on a loader thread (`DecodeLoads.run`) that shakes hands with the prefill engine (decode/peers.py),
picks the load's strategy once (`DecodeLoads._choose`) and runs it; the engine thread polls the
outcome (decode/table.py).

A load moves the blocks covering positions [num_local_computed, + num_external) of a prompt; the
prefill's sender thread WRITEs (push) and its notification arrives on the engine thread again.
Safety (base.py's lifecycle contract): a pull first claims the prefill hold ("claim_read") so it
outlives its lease while the READ runs, and a READ seen done after the load's deadline does not count.
Nothing writes the load's blocks before the forwards the engine launched before start_load ended: one of
them may still write a block freed under it (decode/compute_order.py).
Every block the prefill took off its free list for a load comes back promptly however the load ends: once a
strategy is on the load, the table tells the prefill through it; before that (its handshake failed or was given
up, the prefill's answer could not be planned or failed its checks, it was aborted or timed out) the loader does
(`drop_unstarted`), and so does start_load for params it cannot plan, and release_unloaded (decode/side.py) for a
request that ended before its load started; best effort: the lease stays the backstop. These releases, and the
cancels of pushes, go on the release threads (LoadContext.release_soon), never on a loader thread: against a prefill
that does not answer they wait, and the loader threads are the real loads'.
Handshakes and side-channel calls block, so they run on loader threads, never on the engine thread;
loader threads bind the instance's device when they start (vLLM #39548), since they copy KV.
"""

from __future__ import annotations

import logging
import time

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.decode.answer_checks import check_block_ids, check_digests
from pdlaunch.kv_transfer.decode.context import RELEASE_TIMEOUT_SECONDS, LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState, LoadStrategy
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.decode.pull import PullLoad
from pdlaunch.kv_transfer.decode.push import PushLoad
from pdlaunch.kv_transfer.decode.reshard_load import ReshardLoad, ReshardStaging
from pdlaunch.kv_transfer.decode.staged import StagedLoad
from pdlaunch.kv_transfer.decode.table import LoadTable
from pdlaunch.kv_transfer.fault import TransferFaults
from pdlaunch.kv_transfer.messages import (
    MAX_SECONDS,
    CancelPushAnswer,
    CancelPushRequest,
    DropHeldRequest,
    Empty,
    HeldBlocksAnswer,
    HeldBlocksRequest,
)
from pdlaunch.kv_transfer.push_params import client_request_id
from pdlaunch.kv_transfer.remote_kv import RemoteKV

logger = logging.getLogger(__name__)

# The longest one "held_blocks" ask waits on the prefill: an aborted load asks no more after it. A single ask for
# the load's whole remaining time kept the loader thread (one of four) that long after the client left, from
# every other load, and from the cancels of aborted pushes, whose blocks then drained until their deadline.
HELD_BLOCKS_WAIT_SECONDS = 0.5


class DecodeLoads:
    def __init__(self, ctx: LoadContext) -> None:
        self.ctx = ctx
        self.peers = ctx.peers
        self.table = LoadTable(ctx)
        self.reshard_staging = ReshardStaging(ctx.agent)
        self.faults = TransferFaults()  # test only (PDLAUNCH_TEST_FAIL_TRANSFER_RATE)

    # -- loader threads -----------------------------------------------------------------------
    def run(self, load: Load) -> None:
        """Loader thread: the prefill's block ids if the params lacked them, the handshake (cached per
        engine), the strategy, and its run; a failure fails the load (the engine thread reports it).
        A load that ends before its strategy is on it (aborted or timed out, its handshake failed, or it cannot
        plan the prefill's answer, or that answer fails its checks) is the loader's to tell the prefill about
        (`drop_unstarted`): the table tells it through the strategy, and sees none. Whether the strategy went on
        the load is decided under the lock that aborts and timeouts end it under, so the prefill is told once,
        one way or the other. The block ids ask and the handshake stop waiting once the load ended (Load.stopped)."""
        started = False
        try:
            if load.plan is not None:
                self._ask_block_ids(load)
            if load.reshard is not None:  # from its run on it tells every prefill rank itself (reshard_load.py)
                self.faults.maybe_fail(load.request_id)
                strategy: LoadStrategy = ReshardLoad(self.ctx, self.reshard_staging, load.reshard)
                with self.ctx.lock:
                    load.strategy = strategy
                started = True
                strategy.run(load)
                return
            remote = self.peers.get(load.remote, stopped=load.stopped)
            check_block_ids(load, remote, load.where)
            check_digests(load, load.remote.checksums, load.where)
            strategy = self._choose(remote)
            with self.ctx.lock:
                if load.abandoned or load.state != LoadState.HANDSHAKE:
                    return
                load.strategy, load.remote_agent = strategy, remote.agent_name
                started = True
            self.faults.maybe_fail(load.request_id)  # after the handshake, as a failed transfer would
            spec = self.ctx.spec()
            with self.ctx.lock:
                load.num_bytes = sum(len(pairs) * spec.block_bytes[g] for g, pairs in enumerate(load.pairs))
                if load.state != LoadState.HANDSHAKE:
                    return
                load.state = LoadState.RUNNING
            strategy.run(load)
        except KVTransferError as e:
            self._set_failed(load, e.render())
        except Exception as e:  # a bug must fail the request, not leave it parked until the timeout
            logger.exception("KV load of request %s", load.request_id)
            self._set_failed(load, f"{type(e).__name__}: {e}")
        finally:
            if not started:  # on the release threads: this loader thread is the next load's
                self.ctx.release_soon(load, lambda: self.drop_unstarted(load))

    def _choose(self, remote: RemoteEngine) -> LoadStrategy:
        """The strategy of a load from `remote` (ReshardLoad is chosen in `_run`: it shakes hands itself)."""
        if self.ctx.staging is not None or remote.info.staging_slots:
            return StagedLoad(self.ctx, remote)
        return PullLoad(self.ctx, remote) if remote.mode == "pull" else PushLoad(self.ctx)

    def _ask_block_ids(self, load: Load) -> None:
        """The prefill names the blocks holding this prompt's request ("held_blocks", push_params.py). It may not
        hold it yet (the proxy sent both legs at once): asked again, each ask waiting at most
        HELD_BLOCKS_WAIT_SECONDS there, until the load's deadline, or its abort (its client left). An ask gives up
        its answer once the load is aborted or ended (`Load.stopped`, looked at every client.STOP_POLL_SECONDS), so
        the asking ends then, not at the deadline, and frees this loader thread for other loads: a prefill that takes
        the ask and does not answer it (stalled) used to keep the thread up to the wait + the handshake timeout."""
        assert load.plan is not None
        wanted = load.remote.request_id or f"with X-Request-Id {client_request_id(load.request_id)}"
        while True:
            wait = min(self.ctx.remaining(load, "block ids"), HELD_BLOCKS_WAIT_SECONDS)  # raises once aborted
            message = HeldBlocksRequest(type="held_blocks", request_id=load.remote.request_id, wait=wait,
                                        client_request_id=client_request_id(load.request_id),
                                        prompt_digest=load.prompt_digest)
            # Its answer comes after the wait: read past it (else the last ask, waiting out the load's remaining
            # time, would time out on the socket as the prefill answers).
            answer = self.ctx.ask(load.remote, message, HeldBlocksAnswer, wait + self.ctx.handshake_timeout,
                                  "block ids request", stopped=load.stopped)
            if answer.request_id is not None:
                break
            if time.monotonic() >= load.deadline:
                raise KVTransferError(
                    f"no request {wanted} of this prompt is held at {load.where} within "
                    f"{self.ctx.transfer_timeout:g}s", field="kv_transfer.transfer_timeout_seconds",
                    hint="its lease may have expired, or the decode got another prompt than the prefill")
        remote = load.remote.model_copy(update={"request_id": answer.request_id, "block_ids": answer.block_ids,
                                                "kv_epoch": answer.kv_epoch})
        with self.ctx.lock:  # named before it is planned: a plan that fails still tells the prefill (drop_unstarted)
            load.remote = remote
        pairs = load.plan(remote)
        with self.ctx.lock:
            load.pairs, load.plan = pairs, None

    def drop_unstarted(self, load: Load, ranks: list[RemoteKV] | None = None) -> None:
        """The load ended before its strategy was on it: tell each prefill rank that holds its request for it to drop
        its hold now, else it keeps the request's blocks until its lease ends. On the side channel, which needs no
        transfer agent (nor so a handshake, which may be what failed); best effort, on a release thread (`run` and
        decode/side.py hand it to LoadContext.release_soon), each within RELEASE_TIMEOUT_SECONDS: a prefill that did
        not answer the handshake is not waited for long again; one not told is logged, and its lease frees the
        blocks.
        - A resharding load sends each source rank the release its strategy sends when it fails
          (LoadContext.send_release, with the source's `readers`): such a hold ends once each decode rank that reads
          it sent its one notification (prefill/hold.py), and this one is its rank's. A cancel counts as none: with
          several decode ranks reading one hold (decode TP > prefill TP), the other ranks' read_done then left it
          waiting for this rank's word until their READ claim's cap.
        - Every other load sends cancel_push to `ranks` (default: the rank its params name). It ends this load's
          interest (it names the load, `owner`), not its decode engine's, whatever the mode (unknown when the
          handshake failed); for a hold one decode rank reads, the end a release would give. start_load's loads whose
          params could not be planned name `ranks`: without a plan, the number of decode ranks that notify each
          prefill rank is unknown, and each rank's cancel frees a hold no decode READ claimed."""
        if load.remote.block_ids is None:
            # vLLM's push proxy's params: the prefill never named the request of this prompt ("held_blocks" did not
            # answer). The id the client named is its word alone: a request held for another prompt is not this
            # load's to cancel (a client that learnt its id must not free another client's KV). The prefill is
            # told what was asked for instead: it drops that request's hold, now or when it comes (drop_held).
            if load.plan is not None:
                self.drop_held(load)
            return
        if not load.remote.request_id:  # the params named no held request
            return
        if ranks is None and load.reshard is not None:
            for source in load.reshard.sources:
                self.ctx.send_release(load, source.remote, source.readers)
            return
        timeout = min(RELEASE_TIMEOUT_SECONDS, self.ctx.handshake_timeout)
        for remote in ranks if ranks is not None else [load.remote]:
            message = CancelPushRequest(type="cancel_push", request_id=remote.held_request_id, owner=load.nonce)
            try:
                self.ctx.ask(remote, message, CancelPushAnswer, timeout, "hold release")
            except KVTransferError as e:
                logger.warning("request %s: %s; the prefill keeps the request's blocks until its hold's lease ends "
                               "(kv_transfer.kv_lease_seconds)", load.request_id, e.render())

    def drop_held(self, load: Load) -> None:
        """The load gave up asking "held_blocks", or never asked (its request ended first: release_unloaded): the
        prefill drops the hold of what it asked for (or would have), now or once the prefill leg ends, within a
        transfer timeout (messages.py DropHeldRequest; a load that timed out asking gave up at its deadline, and its
        prefill leg may end after it). Else a prefill leg that ends after its client left the decode leg (vLLM's push
        proxy sends both legs at once) keeps the blocks for the whole lease. Best effort, as `drop_unstarted`."""
        message = DropHeldRequest(type="drop_held", request_id=load.remote.request_id,
                                  client_request_id=client_request_id(load.request_id),
                                  prompt_digest=load.prompt_digest, owner=load.nonce,
                                  seconds=min(self.ctx.transfer_timeout, MAX_SECONDS))  # the prefill clamps it
        try:
            self.ctx.ask(load.remote, message, Empty, min(RELEASE_TIMEOUT_SECONDS, self.ctx.handshake_timeout),
                         "hold drop")
        except KVTransferError as e:
            logger.warning("request %s: %s; a prefill that holds its request later keeps the blocks until the hold's "
                           "lease ends (kv_transfer.kv_lease_seconds)", load.request_id, e.render())

    def _set_failed(self, load: Load, error: str) -> None:
        with self.ctx.lock:
            load.fail(error)

    def shutdown(self) -> None:
        """Abort the running loads, wait for the loader threads, then for the releases (those of the aborted loads
        among them: sent for at most context.SHUTDOWN_DRAIN_SECONDS in all, the rest dropped, logged:
        context.HoldReleases.shutdown), before closing the side-channel connections they use."""
        for request_id in self.table.running():
            self.table.abort(request_id)
        self.ctx.executor.shutdown(wait=True, cancel_futures=True)
        self.ctx.releases.shutdown()
        self.ctx.connections.close()

