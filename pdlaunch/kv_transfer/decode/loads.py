"""Decode side of the NIXL connector: handshakes (cached per prefill engine) and loads.

A load moves the blocks covering positions [num_local_computed, + num_external) of a prompt:
- pull: a loader thread posts one READ (coalesced runs of all groups) with a "read_done"
  notification for the prefill agent; the engine thread polls the READ.
- push: a loader thread sends {"type": "push"} with this agent's metadata and block ids over the
  side channel; the prefill side WRITEs and its "push_done"/"push_failed" notification ends the load.
- staged (either side copies KV through a staging buffer, see staging.py): the loader thread runs
  the whole load in chunks of at most the smaller slot count: (prefill stages, decode READs, unstage)
  or (prefill stages and WRITEs into decode's slots), then decode copies its slots into its blocks.
- resharded (prefill has another TP size): reshard_load.py, pull only.
Safety (base.py's lifecycle contract): a pull first claims the prefill hold ("claim_read") so it
outlives its lease while the READ runs, and a READ seen done after the load's deadline does not count.
A load that fails or is aborted while a push WRITE may still land (or a READ could not be stopped)
"drains": decode asks prefill to cancel ("cancel_push") and reports the request in `safe_to_free`
once prefill says nothing is in flight, the push_done/push_failed notification arrived, the READ
ended, or DRAIN_GRACE_SECONDS after the deadline (prefill posts no WRITE after decode's deadline).
Handshakes and side-channel calls block, so they run on loader threads, never on the engine thread;
loader threads bind the instance's device when they start (vLLM #39548), since they copy KV.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer import side_channel
from pdlaunch.kv_transfer.agent import KVAgent, encode_notif
from pdlaunch.kv_transfer.auth import SideChannelKeys
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.blocks import coalesce, run_descriptors
from pdlaunch.kv_transfer.checksum import verify_blocks
from pdlaunch.kv_transfer.fault import TransferFaults
from pdlaunch.kv_transfer.handshake import DeviceInfo
from pdlaunch.kv_transfer.load import Load
from pdlaunch.kv_transfer.peers import PeerCache, RemoteEngine
from pdlaunch.kv_transfer.push_params import client_request_id
from pdlaunch.kv_transfer.reshard import ReshardPlan
from pdlaunch.kv_transfer.reshard_load import ReshardStaging, run_resharded_load
from pdlaunch.kv_transfer.staging import StagingArea
from pdlaunch.memory import platform
from pdlaunch.metrics import count_kv_transfer_failure, observe_kv_transfer

logger = logging.getLogger(__name__)

# After a load's deadline: a WRITE the prefill side posted before it has ended (prefill stops
# waiting for its WRITE at decode's deadline and cancels it), and message latency is covered.
DRAIN_GRACE_SECONDS = 5.0


class DecodeSide:
    def __init__(
        self,
        agent: KVAgent,
        spec: Callable[[], KVCacheSpec],
        local_device: Callable[[], DeviceInfo],
        transfer_mode: str,
        handshake_timeout: float,
        transfer_timeout: float,
        verify_kv: bool,
        keys: SideChannelKeys,
        device_index: int = 0,
        workers: int = 4,
    ) -> None:
        self.agent = agent
        self.keys = keys
        self._spec = spec
        self.peers = PeerCache(agent, spec, local_device, transfer_mode, handshake_timeout, keys)
        self.handshake_timeout = handshake_timeout
        self.transfer_timeout = transfer_timeout
        self.verify_kv = verify_kv
        self.device_index = device_index
        self.staging: StagingArea | None = None
        self.reshard_staging = ReshardStaging(agent)
        self.faults = TransferFaults()  # test only (PDLAUNCH_TEST_FAIL_TRANSFER_RATE)
        self._chunk_events: dict[str, tuple[threading.Event, list[str]]] = {}
        self._loads: dict[str, Load] = {}
        self._by_nonce: dict[str, Load] = {}
        self._draining: dict[str, Load] = {}  # failed/aborted loads whose blocks a transfer may still write
        self._new_draining: set[str] = set()  # failed loads of the last poll that drain
        self._lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pdlaunch-kv-loader",
                                           initializer=self._bind_loader_thread_device)

    def _bind_loader_thread_device(self) -> None:
        platform.set_device(self.device_index)

    # -- engine thread ------------------------------------------------------------------------
    def start(self, request_id: str, params: dict[str, Any], pairs: list[list[tuple[int, int, int]]],
              reshard: ReshardPlan | None = None) -> None:
        now = time.monotonic()
        load = Load(request_id, params, pairs, deadline=now + self.transfer_timeout, started=now, reshard=reshard)
        with self._lock:
            self._loads[request_id] = load
            self._by_nonce[load.nonce] = load
        self.executor.submit(self._run, load)

    def start_unplanned(self, request_id: str, params: dict[str, Any], digest: str,
                        plan: Callable[[dict[str, Any]], list[list[tuple[int, int, int]]]]) -> None:
        """A load whose params lack the prefill's block ids: the loader thread asks for them first."""
        now = time.monotonic()
        load = Load(request_id, params, [], deadline=now + self.transfer_timeout, started=now, plan=plan,
                    prompt_digest=digest)
        with self._lock:
            self._loads[request_id] = load
            self._by_nonce[load.nonce] = load
        self.executor.submit(self._run, load)

    def fail_now(self, request_id: str, params: dict[str, Any], error: str) -> None:
        """A load that cannot start (bad params); reported failed at the next poll."""
        now = time.monotonic()
        load = Load(request_id, params, [], deadline=now, started=now, state="failed", error=error)
        with self._lock:
            self._loads[request_id] = load

    def on_notif(self, notif: dict[str, Any]) -> None:
        with self._lock:
            chunk = self._chunk_events.pop(str(notif.get("nonce")), None)
            if chunk is not None:  # one chunk of a staged push; its loader thread waits on the event
                if notif["kind"] != "push_done":
                    chunk[1].append(f"the prefill side could not push: {notif.get('error')}")
                chunk[0].set()
                return
            load = self._by_nonce.get(str(notif.get("nonce")))
            if load is None:
                return
            load.write_ended = True  # push_done comes after the WRITE, push_failed after it was stopped
            if load.state in ("ok", "failed"):
                return
            if notif["kind"] == "push_done":
                load.state = "ok"
            else:
                load.state, load.error = "failed", f"the prefill side could not push: {notif.get('error')}"

    def poll(self, now: float) -> tuple[set[str], dict[str, str]]:
        finished: set[str] = set()
        failed: dict[str, str] = {}
        with self._lock:
            loads = list(self._loads.values())
        for load in loads:
            with self._lock:
                if load.state == "posted" and load.xfer is not None:
                    xfer_state = load.xfer.state()
                    if xfer_state == "DONE" and now <= load.deadline:
                        load.state = "ok"  # (after the deadline the prefill hold's cap may have passed)
                    elif xfer_state == "ERR":
                        load.state, load.error = "failed", f"NIXL READ of {load.xfer.num_bytes} bytes failed"
                # A staged load enforces the deadline in its loader thread; the grace covers a stuck one.
                grace = 5.0 if load.state == "staging" else 0.0
                if load.state not in ("ok", "failed") and now > load.deadline + grace:
                    load.error = (
                        f"KV of request {load.request_id} did not arrive within {self.transfer_timeout:g}s "
                        f"({load.mode or 'handshake'} from {load.where}, stage: {load.state})"
                    )
                    load.state = "failed"
                state = load.state
            if state == "ok":
                try:
                    self._complete(load, now)
                    finished.add(load.request_id)
                except KVTransferError as e:
                    load.state, load.error = "failed", e.render()
            drain = False
            if load.state == "failed":
                with self._lock:
                    drain = self._may_write(load)
                    if drain:
                        self._start_drain(load, now)
                failed[load.request_id] = self._fail(load, drain)
            if drain:
                self._new_draining.add(load.request_id)
            elif load.state in ("ok", "failed"):
                self._forget(load)
        return finished, failed

    def _may_write(self, load: Load) -> bool:
        """Whether a transfer may still write into the load's blocks (the lock is held)."""
        if load.push_sent and not load.write_ended:
            return True
        return load.xfer is not None and load.xfer.state() == "PROC"

    def _start_drain(self, load: Load, now: float) -> None:
        """Keep a failed/aborted load's blocks from the engine until no transfer can write them (lock held)."""
        load.drain_until = max(now, load.deadline) + DRAIN_GRACE_SECONDS
        self._draining[load.request_id] = load
        if self._loads.get(load.request_id) is load:
            del self._loads[load.request_id]
        if load.push_sent and not load.write_ended:
            self.executor.submit(self._cancel_push, load)

    def poll_draining(self, now: float) -> tuple[set[str], set[str]]:
        """(failed loads of the last poll that drain, draining loads whose blocks may be freed now)."""
        safe: set[str] = set()
        with self._lock:
            loads = list(self._draining.values())
            new, self._new_draining = self._new_draining, set()
        for load in loads:
            with self._lock:
                busy = self._may_write(load)
            if busy and now <= load.drain_until:
                continue
            if busy:
                logger.warning("request %s: no word that its KV transfer ended %.0fs after its deadline; freeing "
                               "its blocks", load.request_id, DRAIN_GRACE_SECONDS)
            self._release(load)
            if load.mode == "pull" and load.remote_agent is not None:
                self._tell_prefill_release(load)
            with self._lock:
                del self._draining[load.request_id]
                self._by_nonce.pop(load.nonce, None)
            safe.add(load.request_id)
        return new, safe

    def _cancel_push(self, load: Load) -> None:
        """Loader thread: ask prefill to drop the push; no WRITE in flight ends the drain at once."""
        p = load.params
        message = {"type": "cancel_push", "request_id": p["remote_request_id"], "nonce": load.nonce}
        try:
            answer = side_channel.call(p["remote_host"], int(p["remote_port"]), message, self.handshake_timeout,
                                       f"push cancel to {load.where}", self.keys)
        except KVTransferError as e:  # the drain then ends by notification or at drain_until
            logger.warning("request %s: %s", load.request_id, e)
            return
        if not answer.get("in_flight"):
            with self._lock:
                load.write_ended = True

    def _complete(self, load: Load, now: float) -> None:
        expected = load.params.get("kv_checksum") if load.reshard is None else None  # resharded: checked per chunk
        if expected is None and self.verify_kv and load.num_bytes and load.reshard is None:
            raise KVTransferError(
                f"request {load.request_id}: kv_transfer.verify_kv is on here but {load.where} sent no kv_checksum",
                field="kv_transfer.verify_kv",
                hint="turn verify_kv on for the prefill instances too",
            )
        if expected is not None:
            spec = self._spec()
            for g, pairs in enumerate(load.pairs):
                verify_blocks(spec.kv_caches[g], g, [p[1] for p in pairs], [expected[g][p[0]] for p in pairs],
                              load.request_id)
        observe_kv_transfer(load.num_bytes, now - load.started)
        self._release(load)

    def _fail(self, load: Load, draining: bool = False) -> str:
        count_kv_transfer_failure()
        if not draining:  # else poll_draining releases once the transfer ended
            self._release(load)
            if load.mode == "pull" and load.remote_agent is not None:
                self._tell_prefill_release(load)
            elif load.mode == "push" and not load.push_sent:  # never asked: the prefill may free it now
                self.executor.submit(self._cancel_push, load)
        error = load.error or f"KV transfer of request {load.request_id} failed"
        logger.error("KV load of request %s failed: %s", load.request_id, error)
        return error

    def _release(self, load: Load) -> None:
        if load.xfer is not None:
            load.xfer.release()
            load.xfer = None

    def _tell_prefill_release(self, load: Load) -> None:
        try:  # best effort: otherwise the prefill side frees at lease expiry
            release = encode_notif("release", request_id=load.params["remote_request_id"])
            self.agent.notify(load.remote_agent or "", release)
        except Exception as e:
            logger.debug("could not tell prefill to release request %s: %s", load.request_id, e)

    def _forget(self, load: Load) -> None:
        with self._lock:
            if self._loads.get(load.request_id) is load:
                del self._loads[load.request_id]
            self._by_nonce.pop(load.nonce, None)

    def abort(self, request_id: str) -> bool:
        """Drop a load; True when its blocks drain (a transfer may still write them: see poll_draining)."""
        with self._lock:
            load = self._loads.get(request_id)
            if load is None:
                return request_id in self._draining
            load.abandoned = True
            state = load.state
            if state not in ("ok", "failed"):
                load.state, load.error = "failed", "aborted"
            if self._may_write(load):
                self._start_drain(load, time.monotonic())
                return True
        self._release(load)
        if state not in ("ok", "failed") and load.mode == "pull" and load.remote_agent is not None:
            self._tell_prefill_release(load)
        self._forget(load)
        return False

    def staging_users(self) -> set[str]:
        """Request ids that may hold staging slots now: loads still running or draining."""
        with self._lock:
            return set(self._loads) | set(self._draining)

    def num_loading(self) -> int:
        with self._lock:
            return len(self._loads)

    # -- loader threads -----------------------------------------------------------------------
    def _run(self, load: Load) -> None:
        try:
            if load.plan is not None:
                self._ask_block_ids(load)
            if load.reshard is not None:
                self.faults.maybe_fail(load.request_id)
                run_resharded_load(self, load, load.reshard)
                return
            remote = self.peers.get(load.params)
            spec = self._spec()
            with self._lock:
                if load.abandoned or load.state != "handshake":
                    return
                load.mode, load.remote_agent = remote.mode, remote.agent_name
            self.faults.maybe_fail(load.request_id)  # after the handshake, as a failed transfer would
            with self._lock:
                load.num_bytes = sum(len(pairs) * spec.block_bytes[g] for g, pairs in enumerate(load.pairs))
                if self.staging is not None or remote.info.staging_slots:
                    load.state = "staging"
            if load.state == "staging":
                self._run_staged(load, remote, spec)
                return
            if remote.mode == "pull":
                local: list[tuple[int, int]] = []
                rem: list[tuple[int, int]] = []
                for g, pairs in enumerate(load.pairs):
                    runs = coalesce((p[1], p[2]) for p in pairs)
                    lo, ro = run_descriptors(runs, spec.kv_caches[g].data_ptr(), remote.info.base_addrs[g],
                                             spec.block_bytes[g])
                    local += lo
                    rem += ro
                self._pull(load, remote, local, rem)
            else:  # the prefill side builds the descriptors of a push
                pairs = [[[p[1], p[2]] for p in group] for group in load.pairs]
                self._push(load, [t.data_ptr() for t in spec.kv_caches], pairs, spec, last=True)
        except KVTransferError as e:
            self._set_failed(load, e.render())
        except Exception as e:  # a bug must fail the request, not leave it parked until the timeout
            logger.exception("KV load of request %s", load.request_id)
            self._set_failed(load, f"{type(e).__name__}: {e}")

    def _ask_block_ids(self, load: Load) -> None:
        """The prefill names the blocks holding this prompt's request ("held_blocks", push_params.py)."""
        assert load.plan is not None
        p = load.params
        remaining = self._remaining(load, "block ids")
        answer = side_channel.call(
            p["remote_host"], int(p["remote_port"]),
            {"type": "held_blocks", "request_id": p.get("remote_request_id"), "wait": remaining,
             "client_request_id": client_request_id(load.request_id), "prompt_digest": load.prompt_digest},
            remaining, f"block ids request to {load.where}", self.keys)
        params = {**p, "remote_request_id": answer["request_id"], "remote_block_ids": answer["block_ids"],
                  "kv_epoch": answer.get("kv_epoch", 0)}
        pairs = load.plan(params)
        with self._lock:
            load.params, load.pairs, load.plan = params, pairs, None

    def _remaining(self, load: Load, what: str) -> float:
        remaining = load.deadline - time.monotonic()
        if remaining <= 0 or load.abandoned:
            raise KVTransferError(
                f"KV of request {load.request_id} did not arrive within {self.transfer_timeout:g}s "
                f"({load.mode} from {load.where}, stage: {what})" if remaining <= 0 else "aborted",
                field="kv_transfer.transfer_timeout_seconds",
            )
        return remaining

    def _run_staged(self, load: Load, remote: RemoteEngine, spec: KVCacheSpec) -> None:
        """The whole load in chunks through staging slots (this side's, the prefill side's, or both)."""
        p = load.params
        host, port = str(p["remote_host"]), int(p["remote_port"])
        chunk = min(c for c in (self.staging.num_slots if self.staging else 0, remote.info.staging_slots) if c)
        longest = max((len(g) for g in load.pairs), default=0)
        dst_bases = [b.data_ptr() for b in (self.staging.buffers if self.staging else spec.kv_caches)]
        for start in range(0, longest, chunk):
            part = [group[start:start + chunk] for group in load.pairs]
            local_ids = [[x[1] for x in group] for group in part]
            remote_ids = [[x[2] for x in group] for group in part]
            slots: list[int] = []
            if self.staging is not None:
                slots = self.staging.acquire(max(map(len, local_ids)), self._remaining(load, "staging slots"))
            try:
                dst = [slots[:len(ids)] for ids in local_ids] if self.staging is not None else local_ids
                if remote.mode == "pull":
                    self._read_chunk(load, remote, host, port, dst, dst_bases, remote_ids, spec.block_bytes)
                else:
                    pairs = [[[d, r] for d, r in zip(dst[g], remote_ids[g])] for g in range(len(dst))]
                    self._push(load, dst_bases, pairs, spec, last=start + chunk >= longest, wait=True)
                if self.staging is not None:
                    with self._lock:  # never write into blocks the engine freed after a timeout or abort
                        if load.state != "staging" or load.abandoned:
                            return
                        self.staging.scatter(spec.kv_caches, local_ids, slots)
            finally:
                if slots and self.staging is not None:
                    self.staging.release(slots)
        if remote.mode == "pull" or longest == 0:
            self.agent.notify(remote.agent_name, encode_notif("read_done", request_id=p["remote_request_id"]))
        with self._lock:
            if load.state == "staging":
                load.state = "ok"

    def _read_chunk(self, load: Load, remote: RemoteEngine, host: str, port: int, dst: list[list[int]],
                    dst_bases: list[int], remote_ids: list[list[int]], block_bytes: list[int]) -> None:
        """READ remote blocks (or, from a staging prefill side, the slots it stages them in) of
        `block_bytes` per group into dst[g] slots/blocks of dst_bases[g]."""
        src, ticket = remote_ids, None
        if remote.info.staging_slots:
            answer = side_channel.call(host, port, {"type": "stage", "request_id": load.params["remote_request_id"],
                                                    "blocks": remote_ids},
                                       self._remaining(load, "prefill staging"), f"staging request to {load.where}",
                                       self.keys)
            src, ticket = answer["slots"], answer["ticket"]
        try:
            local: list[tuple[int, int]] = []
            rem: list[tuple[int, int]] = []
            for g in range(len(dst)):
                runs = coalesce(list(zip(dst[g], src[g])))
                lo, ro = run_descriptors(runs, dst_bases[g], remote.info.base_addrs[g], block_bytes[g])
                local += lo
                rem += ro
            if local:
                xfer = self.agent.transfer("READ", local, rem, remote.agent_name, remote.info.device.index, b"")
                try:
                    while (state := xfer.state()) == "PROC":
                        self._remaining(load, "READ")
                        time.sleep(0.0002)
                    if state != "DONE":
                        raise KVTransferError(f"NIXL READ of {xfer.num_bytes} bytes failed")
                finally:
                    xfer.release()
        finally:
            if ticket is not None:
                try:
                    side_channel.call(host, port, {"type": "unstage", "ticket": ticket}, self.handshake_timeout,
                                      f"unstage request to {load.where}", self.keys)
                except KVTransferError as e:  # the prefill side frees the slots at the ticket deadline
                    logger.warning("%s", e)

    def _pull(self, load: Load, remote: RemoteEngine, local: list[tuple[int, int]], rem: list[tuple[int, int]]) -> None:
        notif = encode_notif("read_done", request_id=load.params["remote_request_id"])
        if not local:  # nothing to read (1-token prompt, full prefix hit): still let prefill free
            self.agent.notify(remote.agent_name, notif)
            with self._lock:
                load.state = "ok" if load.state == "handshake" else load.state
            return
        # Claim the prefill hold first: it then outlives its lease until our read_done/release (capped).
        p = load.params
        remaining = self._remaining(load, "READ claim")
        side_channel.call(p["remote_host"], int(p["remote_port"]),
                          {"type": "claim_read", "request_id": p["remote_request_id"], "seconds": remaining},
                          remaining, f"READ claim to {load.where}", self.keys)
        xfer = self.agent.transfer("READ", local, rem, remote.agent_name, remote.info.device.index, notif)
        with self._lock:
            if load.state == "handshake" and not load.abandoned:
                load.xfer, load.state = xfer, "posted"
                return
        xfer.release()  # timed out or aborted meanwhile

    def _push(self, load: Load, bases: list[int], pairs: list[list[list[int]]], spec: KVCacheSpec, last: bool,
              wait: bool = False) -> None:
        """Ask the prefill side to WRITE pairs [[my_id, its_block], ...] per group into `bases` (my blocks
        or staging slots). wait=True: block until its notification (staged chunks), else the engine
        thread sees it in poll."""
        nonce = load.nonce
        event: tuple[threading.Event, list[str]] | None = None
        remaining = self._remaining(load, "push request")
        with self._lock:
            if load.abandoned or load.state in ("ok", "failed"):
                raise KVTransferError(f"push of request {load.request_id} not sent: {load.error or 'aborted'}")
            if wait:
                nonce = uuid.uuid4().hex[:16]
                event = self._chunk_events[nonce] = (threading.Event(), [])
            else:
                load.push_sent = True  # from here on prefill may WRITE into our blocks: abort/fail drain
                if load.state == "handshake":
                    load.state = "pushing"  # before asking: the notification may beat the answer
        message = {
            "type": "push",
            "request_id": load.params["remote_request_id"],
            "nonce": nonce,
            "last": last,
            "agent_name": self.agent.name,
            "agent_metadata": self.agent.metadata().hex(),
            "pairs": pairs,
            "base_addrs": bases,
            "block_bytes": spec.block_bytes,
            "device_id": self.agent.device_id,
            "deadline_in": remaining,  # prefill posts no WRITE after this (seconds from receipt)
        }
        p = load.params
        try:
            side_channel.call(p["remote_host"], int(p["remote_port"]), message, remaining,
                              f"push request to {load.where}", self.keys)
            if event is not None:
                if not event[0].wait(self._remaining(load, "push")):
                    self._remaining(load, "push")  # raises the timeout
                if event[1]:
                    raise KVTransferError(event[1][0])
        finally:
            if event is not None:
                with self._lock:
                    self._chunk_events.pop(nonce, None)

    def _set_failed(self, load: Load, error: str) -> None:
        with self._lock:
            if load.state not in ("ok", "failed"):
                load.state, load.error = "failed", error

    def shutdown(self) -> None:
        with self._lock:
            loads = list(self._loads.values())
        for load in loads:
            self.abort(load.request_id)
        self.executor.shutdown(wait=True, cancel_futures=True)
