"""A thin wrapper over one Mooncake TransferEngine: initialise, register memory, move bytes, notify.

Verified with mooncake-transfer-engine-non-cuda 0.3.13.post1 on CPU: `initialize(host, "P2PHANDSHAKE",
"tcp", "")` listens for the P2P handshake on host:<rpc port> (session id "host:port"), and a peer's
segment is opened on the first transfer to its session id, so no metadata server is needed. With a
metadata server, the name given to `initialize` is only the key the engine registers under (it listens on
a port of its own, on the address it finds, and registers those), and peers look it up by that key.
`batch_transfer_sync_write/read` block (the GIL released) until the batch completed, failed or ran
past Mooncake's own timeout, but a failed batch returns while its other pieces still move (`transfer`);
`get_batch_transfer_status` ends the same way. `transfer_check_status` polls the first piece of a batch
without blocking, so `transfer` gives each piece a batch and polls them all; it blocks all the same, and
callers run transfers on their own threads (mooncake/sender.py). A zero-length transfer
with a TransferNotify delivers just the notification to the peer's `get_notifies`.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from typing import Any

from pdlaunch.config.mooncake_install import INSTALL_HINT, missing_reason
from pdlaunch.config.serving_env import MC_TRANSFER_SECONDS_PER_BYTE, mooncake_transfer_timeout
from pdlaunch.errors import KVTransferError

logger = logging.getLogger(__name__)

# A transfer's pieces are polled every 1/16 of the time it has run, within these bounds: a finished transfer is
# seen at most ~6% (or 0.25 ms) late, with a few dozen polls (as prefill/push_sender.py polls a WRITE).
_MIN_POLL_SECONDS = 0.00002
_MAX_POLL_SECONDS = 0.00025
# Pieces still running at the transfer's timeout are polled this much longer: Mooncake's own timeout for them, the
# same length counted from their submission a moment later, ends them then. Only once they ended may the caller
# free or hand on their memory, and only a batch seen ended is freed by Mooncake.
_TIMEOUT_GRACE_SECONDS = 5.0

def import_engine() -> Any:
    """The `mooncake.engine` module, or a KVTransferError saying what is missing."""
    reason = missing_reason()
    if reason is not None:
        raise KVTransferError(reason, field="kv_transfer.connector", hint=INSTALL_HINT)
    from mooncake import engine

    return engine


def _unused_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MooncakeEngine:
    """One TransferEngine. `session_id` is how peers name it in transfers: "host:rpc_port" over the P2P handshake,
    "host-<16 hex digits>:port" registered with a metadata server."""

    def __init__(self, hostname: str, protocol: str, metadata_server: str | None) -> None:
        engine = import_engine()
        self._mc = engine
        self.protocol = protocol
        self.metadata_server = metadata_server or "P2PHANDSHAKE"
        self.engine = engine.TransferEngine()
        # P2P handshake: the engine picks its RPC port and peers address it as host:port. With a metadata
        # server the name given here is the key peers look up (not a listening port), and one server may hold
        # the engines of several deployments and hosts: host and a port free here now are not unique there
        # (every host of the default side_channel_host is 127.0.0.1, and a probed port is free again for the
        # next engine), and Mooncake's HTTP server refuses a taken name. A random part makes it the engine's own.
        name = f"{hostname}-{secrets.token_hex(8)}:{_unused_port(hostname)}" if metadata_server else hostname
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
        """Blocking WRITE (local -> remote) or READ (remote -> local) of matching (address, length) lists, which
        returns or raises only once none of its pieces moves any more: a piece still running at the timeout (the one
        Mooncake gives it) is polled until Mooncake ends it, at most _TIMEOUT_GRACE_SECONDS longer.

        Each piece is a batch of its own, all submitted at once and polled to their ends: Mooncake's batch calls
        report a batch failed as soon as one piece failed while its other pieces still land (0.3.13 over TCP:
        80 MB of 100 MB still to come), and the caller frees or hands on the memory once this returns."""
        submit = self.engine.batch_transfer_async_write if op == "WRITE" else self.engine.batch_transfer_async_read
        num_bytes = sum(n for _, n in local)
        started = time.monotonic()
        timeout = mooncake_transfer_timeout(os.environ) + num_bytes * MC_TRANSFER_SECONDS_PER_BYTE
        running: list[int] = []
        failed = 0
        for (address, length), (peer_address, _) in zip(local, remote, strict=True):
            batch = submit(session, [address], [peer_address], [length])
            if batch <= 0:  # refused (0): none of its bytes move, nor those of the rest, not submitted
                failed = len(local) - len(running)  # a peer that cannot be reached would cost a connect each
                break
            running.append(batch)
        late = 0  # pieces still running at the timeout
        while running:
            # transfer_check_status: 0 runs, 1 done, -1 failed, -2 timed out; Mooncake frees a done or failed batch
            codes = [(batch, self.engine.transfer_check_status(batch)) for batch in running]
            running = [batch for batch, code in codes if code == 0]
            failed += sum(code not in (0, 1) for _, code in codes)
            waited = time.monotonic() - started
            if running and not late and waited >= timeout:
                late = len(running)
                logger.warning("Mooncake %s of %d bytes with %s: %d of %d pieces still run at its %.0fs timeout; "
                               "waiting up to %.0fs more for Mooncake to end them", op, num_bytes, session, late,
                               len(local), timeout, _TIMEOUT_GRACE_SECONDS)
            if running and waited >= timeout + _TIMEOUT_GRACE_SECONDS:
                logger.error("Mooncake %s with %s: %d pieces still run %.0fs past the transfer's timeout; their "
                             "memory may still be written and their batches are never freed", op, session,
                             len(running), _TIMEOUT_GRACE_SECONDS)
                raise KVTransferError(
                    f"Mooncake {op} of {num_bytes} bytes with {session}: {len(running)} of {len(local)} pieces did "
                    f"not end within {timeout + _TIMEOUT_GRACE_SECONDS:.0f}s ({self.protocol})",
                    hint="MC_TRANSFER_TIMEOUT (seconds, plus 1 s per GB moved) bounds a transfer; the peer may be "
                    "gone or its network congested")
            if running:
                time.sleep(min(max(waited / 16, _MIN_POLL_SECONDS), _MAX_POLL_SECONDS))
        if late and not failed:
            logger.warning("Mooncake %s of %d bytes with %s ended %.1fs past its timeout, every piece landed", op,
                           num_bytes, session, time.monotonic() - started - timeout)
        if failed:
            raise KVTransferError(f"Mooncake {op} of {num_bytes} bytes with {session} failed: {failed} of "
                                  f"{len(local)} pieces failed ({self.protocol})",
                                  hint="see the Mooncake lines above in this log")

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
