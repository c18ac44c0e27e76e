"""A thin wrapper over one Mooncake TransferEngine: initialise, register memory, move bytes, notify.

Verified with mooncake-transfer-engine-non-cuda 0.3.13.post1 on CPU: `initialize(host, "P2PHANDSHAKE",
"tcp", "")` listens for the P2P handshake on host:<rpc port> (session id "host:port"), and a peer's
segment is opened on the first transfer to its session id, so no metadata server is needed.
`batch_transfer_sync_write/read` block (the GIL released) until the batch completed, failed or ran
past Mooncake's own timeout; `get_batch_transfer_status` blocks the same way, so there is no cheap poll
of a batch: callers run transfers on their own threads (mooncake_sender.py). A zero-length transfer
with a TransferNotify delivers just the notification to the peer's `get_notifies`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import socket
from typing import Any

from pdlaunch.errors import KVTransferError

logger = logging.getLogger(__name__)

PACKAGE = "mooncake-transfer-engine-non-cuda"  # CPU; on CUDA hosts mooncake-transfer-engine (CUDA 12)
SYSTEM_LIBRARIES = "libibverbs1 librdmacm1 libnuma1"
INSTALL_HINT = (f"pip install 'pdlaunch[mooncake]' (or {PACKAGE}; mooncake-transfer-engine on CUDA 12 hosts), "
                f"and on Debian/Ubuntu: apt-get install {SYSTEM_LIBRARIES}; or use --kv-connector nixl")
_RDMA_DEVICES = "/sys/class/infiniband"


def missing_reason() -> str | None:
    """What keeps `mooncake.engine` from importing here (the package, or a system library it links), or None."""
    # Mooncake reads its log level when it loads, and logs every handshake and batch at INFO to stderr:
    # our logs keep its warnings and errors.
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
    try:
        from mooncake import engine  # noqa: F401
    except ImportError as e:
        text = str(e)
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "mooncake":
            return f"the Mooncake transfer engine package is not installed ({PACKAGE})"
        library = re.search(r"(lib[\w+-]+\.so[.\d]*)", text)
        if library:
            return f"the system library {library.group(1)} that Mooncake links is missing ({text})"
        return f"mooncake.engine cannot be imported: {text}"
    return None


def cpu_only_build() -> bool:
    """Whether the Mooncake installed here is the CPU-only wheel, which cannot move GPU memory."""
    cuda_builds = ("mooncake-transfer-engine", "mooncake-transfer-engine-cuda13")
    return _installed(PACKAGE) and not any(_installed(name) for name in cuda_builds)


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def import_engine() -> Any:
    """The `mooncake.engine` module, or a KVTransferError saying what is missing."""
    reason = missing_reason()
    if reason is not None:
        raise KVTransferError(reason, field="kv_transfer.connector", hint=INSTALL_HINT)
    from mooncake import engine

    return engine


def resolve_protocol(configured: str) -> tuple[str, str]:
    """(protocol, why): auto is rdma where the kernel lists an RDMA device, else tcp."""
    if configured != "auto":
        return configured, f"kv_transfer.mooncake_protocol is {configured}"
    devices = sorted(os.listdir(_RDMA_DEVICES)) if os.path.isdir(_RDMA_DEVICES) else []
    if devices:
        return "rdma", f"RDMA device(s) {', '.join(devices)} found in {_RDMA_DEVICES}"
    return "tcp", f"no RDMA device in {_RDMA_DEVICES}"


def _unused_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MooncakeEngine:
    """One TransferEngine. `session_id` ("host:port") is how peers name it in transfers."""

    def __init__(self, hostname: str, protocol: str, metadata_server: str | None) -> None:
        engine = import_engine()
        self._mc = engine
        self.protocol = protocol
        self.metadata_server = metadata_server or "P2PHANDSHAKE"
        self.engine = engine.TransferEngine()
        # P2P handshake: the engine picks its RPC port and peers address it as host:port. With a metadata
        # server the name given here is the key peers look up (not a listening port): unique per host.
        name = f"{hostname}:{_unused_port(hostname)}" if metadata_server else hostname
        code = self.engine.initialize(name, self.metadata_server, protocol, "")
        if code != 0:
            raise KVTransferError(
                f"the Mooncake transfer engine did not start on {hostname} ({protocol}, metadata "
                f"{self.metadata_server}): code {code}",
                field="kv_transfer.mooncake_protocol" if protocol == "rdma" else "kv_transfer.side_channel_host",
                hint="the host must be an address of this machine; rdma needs an RDMA device "
                "(mooncake_protocol: tcp works everywhere); a metadata server must be reachable",
            )
        self.session_id = name if metadata_server else f"{hostname}:{self.engine.get_rpc_port()}"
        self._registered: list[int] = []

    def register(self, address: int, nbytes: int, location: str) -> None:
        code = self.engine.register_memory(address, nbytes, location)
        if code != 0:
            raise KVTransferError(f"Mooncake could not register {nbytes} bytes at {address:#x} ({location}): "
                                  f"code {code}", hint="see the Mooncake lines above in this log")
        self._registered.append(address)

    def unregister(self, address: int) -> None:
        if address in self._registered:
            self._registered.remove(address)
            code = self.engine.unregister_memory(address)
            if code != 0:
                logger.warning("Mooncake could not deregister memory at %#x: code %d", address, code)

    def unregister_all(self) -> None:
        for address in list(self._registered):
            self.unregister(address)

    def transfer(self, op: str, session: str, local: list[tuple[int, int]], remote: list[tuple[int, int]]) -> None:
        """Blocking WRITE (local -> remote) or READ (remote -> local) of matching (address, length) lists."""
        run = self.engine.batch_transfer_sync_write if op == "WRITE" else self.engine.batch_transfer_sync_read
        code = run(session, [a for a, _ in local], [a for a, _ in remote], [n for _, n in local])
        if code != 0:
            raise KVTransferError(f"Mooncake {op} of {sum(n for _, n in local)} bytes with {session} failed "
                                  f"(code {code}, {self.protocol})", hint="see the Mooncake lines above in this log")

    def notify(self, session: str, name: str, message: str) -> None:
        """Deliver (name, message) to the peer's `notifications` (a zero-length WRITE carries it)."""
        notify = self._mc.TransferNotify(name, message)
        code = self.engine.transfer_sync(session, 0, 0, 0, self._mc.TransferOpcode.Write, notify)
        if code != 0:
            raise KVTransferError(f"Mooncake could not notify {session} (code {code})")

    def notifications(self) -> list[tuple[str, str]]:
        return [(n.name, n.msg) for n in self.engine.get_notifies()]

    def close(self) -> None:
        """Deregister memory; dropping the last reference stops the engine's threads and sockets."""
        if self.engine is not None:
            self.unregister_all()
            self.engine = None
