"""Prefill side of the NIXL connector: held requests, leases, and the push sender pool.

A request that finished prefill with do_remote_decode keeps its blocks ("hold") until
- pull: the decode agent's READ completes and its notification ("read_done") arrives, or
- push: a sender thread WROTE the blocks into decode's blocks and notified decode, or
- decode says it gave up ("release"), or
- the lease (kv_transfer.kv_lease_seconds) expires: decode died or the client went away.
Each of these reports the request in `finished_sending` exactly once, so the engine frees it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.agent import KVAgent, XferHandle, encode_notif
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.memory import platform
from pdlaunch.metrics import KV_EXPIRED_REQUESTS

logger = logging.getLogger(__name__)

_POLL_SECONDS = 0.0005  # sender threads poll their WRITE; completion is usually sub-millisecond per MiB


@dataclass
class Hold:
    request_id: str
    block_ids: list[list[int]]
    deadline: float  # time.monotonic() when the lease expires
    busy: bool = False  # a push WRITE is reading these blocks: neither expire nor free them yet
    done: bool = False  # may be freed
    expired: bool = False


class PrefillSide:
    """Owns the holds; `poll` is called from the engine thread, `handle_push` from side-channel threads."""

    def __init__(
        self, agent: KVAgent, lease_seconds: float, transfer_timeout: float, device_index: int, workers: int = 2
    ) -> None:
        self.agent = agent
        self.lease_seconds = lease_seconds
        self.transfer_timeout = transfer_timeout
        self.device_index = device_index
        self.spec: KVCacheSpec | None = None
        self._holds: dict[str, Hold] = {}
        self._peers: dict[str, str] = {}  # decode agent name -> loaded name
        self._lock = threading.Lock()
        # Seed 000: CUDA's current device is per thread; bind it once when each sender thread starts.
        self.executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="pdlaunch-kv-sender", initializer=self._bind_sender_thread_device
        )

    def _bind_sender_thread_device(self) -> None:
        platform.set_device(self.device_index)

    # -- engine thread ------------------------------------------------------------------------
    def hold(self, request_id: str, block_ids: list[list[int]]) -> None:
        with self._lock:
            self._holds[request_id] = Hold(request_id, [list(b) for b in block_ids], time.monotonic() + self.lease_seconds)

    def on_notif(self, notif: dict[str, Any]) -> None:
        """A decode agent finished reading (read_done) or gave up (release) on a request."""
        request_id = str(notif.get("request_id"))
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is not None:
                hold.done = True
        if hold is None:
            logger.warning("KV %s notification for request %s, which is not held (lease expired?)",
                           notif.get("kind"), request_id)

    def poll(self, now: float) -> set[str]:
        """Requests whose blocks may be freed now; counts lease expiries."""
        finished: set[str] = set()
        with self._lock:
            for hold in list(self._holds.values()):
                if not hold.done and not hold.busy and now > hold.deadline:
                    hold.done = hold.expired = True
                if hold.done and not hold.busy:
                    finished.add(hold.request_id)
                    del self._holds[hold.request_id]
                    if hold.expired:
                        KV_EXPIRED_REQUESTS.inc()
                        logger.warning("KV of request %s was not fetched within the %.1fs lease: freed",
                                       hold.request_id, self.lease_seconds)
        return finished

    def num_held(self) -> int:
        with self._lock:
            return len(self._holds)

    # -- side-channel threads -----------------------------------------------------------------
    def handle_push(self, message: dict[str, Any]) -> dict[str, Any]:
        """Decode asks: WRITE the blocks of `request_id` into mine, then notify me with `nonce`."""
        if self.spec is None:
            raise KVTransferError("this prefill engine has not registered its KV cache yet")
        request_id = str(message["request_id"])
        runs = message["runs"]
        self._check_runs(request_id, runs, message["block_bytes"])
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None:
                raise KVTransferError(
                    f"request {request_id} is not held here: its lease ({self.lease_seconds:g}s) expired "
                    "or its KV was already sent",
                    field="kv_transfer.kv_lease_seconds",
                    hint="raise the lease if decode queues requests longer than that",
                )
            if hold.busy:
                raise KVTransferError(f"request {request_id} is already being pushed")
            held = [set(b) for b in hold.block_ids]
            for run in runs:
                wanted = range(run["prefill_start"], run["prefill_start"] + run["count"])
                if not set(wanted) <= held[run["group"]]:
                    raise KVTransferError(f"push of request {request_id} names blocks it does not hold: {run}")
            hold.busy = True
        try:
            peer = self._peer(message["agent_name"], message["agent_metadata"])
            self.executor.submit(self._push, hold, message, peer)
        except Exception:
            with self._lock:
                hold.busy = False
            raise
        return {}

    def _check_runs(self, request_id: str, runs: list[dict[str, int]], block_bytes: list[int]) -> None:
        assert self.spec is not None
        if block_bytes != self.spec.block_bytes:
            raise KVTransferError(
                f"push of request {request_id}: decode blocks are {block_bytes} bytes, mine {self.spec.block_bytes}",
                hint="prefill and decode must run the same model, dtype, block size and TP size",
            )
        for run in runs:
            if not 0 <= run["group"] < len(self.spec.kv_caches) or run["count"] <= 0:
                raise KVTransferError(f"push of request {request_id}: malformed run {run}")

    def _peer(self, name: str, metadata_hex: str) -> str:
        with self._lock:
            loaded = self._peers.get(name)
        if loaded is None:
            loaded = self.agent.add_remote(bytes.fromhex(metadata_hex))
            with self._lock:
                self._peers[name] = loaded
        return loaded

    # -- sender threads -----------------------------------------------------------------------
    def _push(self, hold: Hold, message: dict[str, Any], peer: str) -> None:
        assert self.spec is not None
        nonce = message["nonce"]
        xfer: XferHandle | None = None
        try:
            local: list[tuple[int, int]] = []
            remote: list[tuple[int, int]] = []
            for run in message["runs"]:
                g, size = run["group"], self.spec.block_bytes[run["group"]]
                local.append((self.spec.kv_caches[g].data_ptr() + run["prefill_start"] * size, run["count"] * size))
                remote.append((message["base_addrs"][g] + run["decode_start"] * size, run["count"] * size))
            if not local:
                self.agent.notify(peer, encode_notif("push_done", nonce=nonce))
                return
            xfer = self.agent.transfer("WRITE", local, remote, peer, message["device_id"],
                                       encode_notif("push_done", nonce=nonce))
            deadline = time.monotonic() + self.transfer_timeout
            while (state := xfer.state()) == "PROC" and time.monotonic() < deadline:
                time.sleep(_POLL_SECONDS)
            if state != "DONE":
                raise KVTransferError(
                    f"WRITE of {xfer.num_bytes} bytes for request {hold.request_id} "
                    + ("failed in NIXL" if state == "ERR" else f"did not finish within {self.transfer_timeout:g}s")
                )
        except Exception as e:
            text = e.render() if isinstance(e, KVTransferError) else f"{type(e).__name__}: {e}"
            logger.error("push of request %s failed: %s", hold.request_id, text)
            try:
                self.agent.notify(peer, encode_notif("push_failed", nonce=nonce, error=text))
            except Exception as notify_error:  # decode then times out with its own message
                logger.warning("could not tell decode that the push failed: %s", notify_error)
        finally:
            if xfer is not None:
                xfer.release()
            with self._lock:
                hold.busy = False
                hold.done = True

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
