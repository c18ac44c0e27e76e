"""A thin wrapper over one NIXL agent (UCX backend): register KV memory, READ/WRITE byte ranges, notify.

The agent is used from the engine thread (polling, notifications), the side-channel threads (adding
peers) and the push sender threads, so it runs in NIXL's STRICT thread-sync mode.

UCX's CUDA IPC cache is off (UCX_CUDA_IPC_CACHE=n) in every process that makes an agent on a host with CUDA, unless
the user set that variable. A peer that loaded an agent's metadata and READ or WROTE its GPU memory maps that memory
(CUDA IPC), and the mapping keeps it allocated after its owner died. Measured on one H200 (nixl 1.5.1, UCX): process
A registered a 20 GiB cudaMalloc tensor, B wrote into it, A died: A's 20 GiB stayed allocated while B lived. With
the cache on (UCX's default), neither `forget_remote` (remove_remote_agent) nor closing B's agent freed them, only
B's exit; with it off, `forget_remote` did. A dead decode's KV cache would otherwise stay held by every prefill that
pushed into it, and the instance restarted on that GPU would find its memory taken (a smaller KV cache, or an out-
of-memory error at start). Sleep relies on it too (peers forget a sleeping engine's agent). The cost, measured with
`pdlaunch bench kv-transfer` (push within one H200, two runs each): ~0.2 ms more a push of 8192 tokens (1.93-1.98 ms
with the cache, 2.13-2.23 without; 1024 tokens 1.19-1.37 against 1.21-1.42 ms); across two H200s (NVLink) none
shows within run-to-run noise (benchmarks/RESULTS.md, 2026-11-29). UCX_CUDA_IPC_CACHE=y turns the cache
back on, and a dead peer's memory then stays allocated until this process exits.
"""

from __future__ import annotations

import logging
import os
import threading
import types
from typing import Any

import torch

from pdlaunch.errors import KVTransferError
from pdlaunch.memory.host_devices import cuda_available

logger = logging.getLogger(__name__)


def _nixl() -> Any:
    try:
        from nixl import _api
    except ImportError as e:
        raise KVTransferError(
            f"the nixl package cannot be imported: {e}",
            field="kv_transfer.connector",
            hint="install it (`pip install nixl`) or use --kv-connector storage",
        ) from e
    return _api


# How long NIXL's UCX progress thread sleeps in poll() when no UCX event fd fires. The thread wakes at
# once on an event (an arriving notification, a completion of a transport that signals one); the
# timeout only bounds how late progress of a transport without events can be. Our own engine and
# sender threads progress their transfers themselves (check_xfer_state, get_new_notifs).
PROGRESS_WAIT_US = 10_000
_agent_lock = threading.Lock()
IPC_CACHE_ENV = "UCX_CUDA_IPC_CACHE"
_ipc_cache_said: list[str] = []  # the value this process's agents use, once logged


def use_ipc_cache_setting() -> str | None:
    """UCX_CUDA_IPC_CACHE for this process's agents: "n" unless the user set it (module docstring), on a host with
    CUDA only: elsewhere UCX has no CUDA transport and would warn at every start that the variable is unused. UCX
    reads it when an agent's UCX context starts, so this runs before each agent is built; the value is logged once."""
    with _agent_lock:
        user = os.environ.get(IPC_CACHE_ENV)
        if user is None and cuda_available():
            os.environ[IPC_CACHE_ENV] = "n"
        value = os.environ.get(IPC_CACHE_ENV)
        if value is not None and not _ipc_cache_said:
            _ipc_cache_said.append(value)
            if user is None:
                logger.info("%s=n: a peer's GPU memory is unmapped when its agent is forgotten (set %s=y to "
                            "keep UCX's mapping cache: ~0.2 ms faster pushes, but a dead peer's memory then "
                            "stays allocated while this process lives)", IPC_CACHE_ENV, IPC_CACHE_ENV)
            else:
                logger.info("%s=%s, as set in the environment (pdlaunch's default is n: kv_transfer/agent.py "
                            "says why)", IPC_CACHE_ENV, value)
    return value


def _create_agent(api: Any, name: str, config: Any) -> Any:
    """`nixl_agent(name, config)` whose UCX progress thread waits for events between rounds.

    nixl's Python wrapper (1.5) sets `pthrDelay = 0` on the native agent config, and the UCX backend
    uses that delay as its poll() timeout: its progress thread then never sleeps and costs a full core
    per process even when nothing moves (issue 33). The wrapper offers no option for it, so the agent
    is built while the wrapper's binding module hands out a config whose delay cannot go below
    PROGRESS_WAIT_US; everything else in the config is the wrapper's.
    """
    bindings = api.nixlBind
    base = bindings.nixlAgentConfig

    class _WaitingConfig(base):  # type: ignore[misc,valid-type]
        @property
        def pthrDelay(self) -> int:  # noqa: N802 - the binding's attribute name
            return int(base.pthrDelay.__get__(self))

        @pthrDelay.setter
        def pthrDelay(self, delay_us: int) -> None:  # noqa: N802
            base.pthrDelay.__set__(self, max(int(delay_us), PROGRESS_WAIT_US))

    class _Bindings(types.ModuleType):
        nixlAgentConfig = _WaitingConfig  # noqa: N815

        def __getattr__(self, attr: str) -> Any:
            return getattr(bindings, attr)

    with _agent_lock:  # the swap is visible to every thread that builds an agent meanwhile
        api.nixlBind = _Bindings(bindings.__name__)
        try:
            return api.nixl_agent(name, config)
        finally:
            api.nixlBind = bindings


class XferHandle:
    """One posted READ or WRITE; `state()` is "PROC", "DONE" or "ERR"."""

    def __init__(self, agent: KVAgent, handle: Any, status: str, num_bytes: int) -> None:
        self._agent = agent
        self._handle = handle
        self._status = status
        self.num_bytes = num_bytes
        self.error: str | None = None  # why the transfer failed, when NIXL raised rather than answered "ERR"

    def state(self) -> str:
        """The transfer's state. NIXL raises (e.g. NIXL_ERR_REMOTE_DISCONNECT) when the peer died
        mid-transfer: that transfer has failed ("ERR"), which its request handles; it must not end the
        engine step that polled it."""
        if self._status == "PROC":
            try:
                self._status = self._agent.nixl.check_xfer_state(self._handle)
            except Exception as e:  # noqa: BLE001 - one error type per NIXL backend and binding
                self._status, self.error = "ERR", f"{type(e).__name__}: {e}"
                logger.warning("NIXL transfer of %d bytes failed: %s", self.num_bytes, self.error)
        return self._status

    def release(self) -> None:
        """Free the request; an active transfer is cancelled (NIXL refuses if it cannot be)."""
        if self._handle is None:
            return
        try:
            self._agent.nixl.release_xfer_handle(self._handle)
        except Exception as e:  # the handle stays with NIXL; the agent frees it at shutdown
            logger.warning("could not release a NIXL transfer handle: %s", e)
        self._handle = None


class KVAgent:
    """One NIXL agent with the KV cache tensors of one engine (one TP rank) registered."""

    release_wait_seconds = 0.0  # XferHandle.release cancels a running transfer
    release_wait_seconds_per_byte = 0.0
    release_cancels = True

    def __init__(self, name: str) -> None:
        api = _nixl()
        # No NIXL metadata listener: it would hand our agent metadata (which lets a peer READ and WRITE
        # the KV memory) to any local process; peers get it only through the authenticated side channel.
        config = api.nixl_agent_config(
            backends=["UCX"], sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT, enable_listen_thread=False,
        )
        self.name = name
        use_ipc_cache_setting()
        self.nixl = _create_agent(api, name, config)
        self._registered: Any = None
        self._extra: list[Any] = []  # later registrations (resharding staging buffers)
        self._remote_agents: set[str] = set()
        self.mem_type = "DRAM"
        self.device_id = 0

    def register(self, kv_caches: list[torch.Tensor]) -> None:
        """Register each group tensor as one region (once)."""
        if self._registered is not None:
            raise KVTransferError("KV caches are already registered with NIXL", hint="register_kv_caches runs once")
        for t in kv_caches:
            if not t.is_contiguous():
                raise KVTransferError("a KV cache tensor is not contiguous", hint="allocate it with torch.empty")
        self.mem_type = "DRAM" if kv_caches[0].device.type == "cpu" else "VRAM"
        self.device_id = max(kv_caches[0].get_device(), 0)
        self._registered = self.nixl.register_memory(kv_caches)

    def deregister(self) -> None:
        """Deregister what `register` registered (before that memory is freed, e.g. for sleep)."""
        if self._registered is not None:
            self.nixl.deregister_memory(self._registered)
            self._registered = None

    def reregister(self, kv_caches: list[torch.Tensor]) -> None:
        """Register the KV caches again: after a wake-up their physical pages are new (CuMem keeps
        the virtual addresses), so the old registration no longer describes them."""
        self.deregister()
        self.register(kv_caches)

    def forget_remote(self, name: str) -> None:
        """Drop a peer's metadata: a newer one replaces it (the peer re-registered), or the peer sleeps or died.
        UCX unmaps the peer's memory it mapped for our transfers (with its IPC cache off: module docstring)."""
        if name in self._remote_agents:
            self.nixl.remove_remote_agent(name)
            self._remote_agents.discard(name)

    def register_extra(self, tensors: list[torch.Tensor]) -> None:
        """Register more memory of the same kind after `register` (a buffer allocated on first need)."""
        if self._registered is None:
            raise KVTransferError("register the KV caches before extra buffers")
        self._extra.append(self.nixl.register_memory(tensors))

    def metadata(self) -> bytes:
        return bytes(self.nixl.get_agent_metadata())

    def connection_metadata(self) -> bytes:
        """This agent's connection info and none of its memory: a peer that loads it can send us
        notifications, and maps nothing of ours."""
        from nixl import _bindings

        return bytes(self.nixl.get_partial_agent_metadata(_bindings.nixlRegDList(_bindings.DRAM_SEG), True, ["UCX"]))

    def add_remote(self, metadata: bytes) -> str:
        """Load a peer's metadata (once per peer name); returns the peer's agent name."""
        try:
            name = self.nixl.add_remote_agent(metadata)
        except Exception as e:  # noqa: BLE001 - NIXL raises its own types for metadata it cannot parse
            raise KVTransferError(f"the peer's NIXL agent metadata cannot be loaded: {type(e).__name__}: {e}",
                                  hint="peers must run the same nixl version") from None
        name = name.decode() if isinstance(name, bytes) else str(name)
        self._remote_agents.add(name)
        return name

    def transfer(
        self,
        op: str,
        local: list[tuple[int, int]],
        remote: list[tuple[int, int]],
        remote_agent: str,
        remote_device_id: int,
        notif: bytes,
    ) -> XferHandle:
        """Post op ("READ": remote -> local, "WRITE": local -> remote) of matching (address, length) lists."""
        local_descs = self.nixl.get_xfer_descs([(a, n, self.device_id) for a, n in local], self.mem_type)
        remote_descs = self.nixl.get_xfer_descs([(a, n, remote_device_id) for a, n in remote], self.mem_type)
        handle = self.nixl.initialize_xfer(op, local_descs, remote_descs, remote_agent, notif)
        status = self.nixl.transfer(handle)
        xfer = XferHandle(self, handle, status, sum(n for _, n in local))
        if status == "ERR":
            xfer.release()
            raise KVTransferError(f"NIXL could not post a {op} of {xfer.num_bytes} bytes to agent {remote_agent}")
        return xfer

    def notify(self, remote_agent: str, message: bytes) -> None:
        self.nixl.send_notif(remote_agent, message)

    def push_done(self, remote_agent: str, message: bytes) -> None:
        """A push of no block's push_done: a notification like any other here (send_notif raises when it fails)."""
        self.notify(remote_agent, message)

    def new_notifs(self) -> list[bytes]:
        return [m for messages in self.nixl.get_new_notifs().values() for m in messages]

    def close(self) -> None:
        """Forget peers, deregister memory, destroy the agent. Idempotent."""
        if self.nixl is None:
            return
        for name in list(self._remote_agents):
            try:
                self.nixl.remove_remote_agent(name)
            except Exception as e:
                logger.debug("removing NIXL peer %s: %s", name, e)
        self._remote_agents.clear()
        for extra in self._extra:
            self.nixl.deregister_memory(extra)
        self._extra.clear()
        if self._registered is not None:
            self.nixl.deregister_memory(self._registered)
            self._registered = None
        # Dropping the last reference destroys the native agent (UCX workers, listen sockets).
        self.nixl = None
