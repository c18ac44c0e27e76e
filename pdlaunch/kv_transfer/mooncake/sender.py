"""The thread pool that runs Mooncake transfers, and the handle a posted transfer returns.

Mooncake's Python transfers block until they end (mooncake/engine.py), so every READ and WRITE runs
on this pool: the caller (the prefill's push sender thread, the decode's loader thread) gets a handle
at once and polls `state()` like a NIXL transfer. A transfer that carries a notification sends it
only once the bytes landed, so the peer learns of the transfer only once it is complete: a WRITE's
push_done from the same pool thread (the WRITE fails with it), a READ's read_done queued on the
agent's notifier (mooncake/agent.py).

Seed 000: the CUDA device is per thread, and Mooncake's NVLink/CUDA-IPC paths use the calling thread's
device. The connector captures the device index before the TransferEngine exists (it may change the
current device while initialising); each pool thread binds that index once, in the pool's initializer.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from pdlaunch.config.serving_env import MC_TRANSFER_SECONDS_PER_BYTE, mooncake_transfer_timeout
from pdlaunch.errors import KVTransferError
from pdlaunch.memory import platform

logger = logging.getLogger(__name__)


def release_wait_seconds(environ: Mapping[str, str], num_bytes: int = 0) -> float:
    """How long release() waits for a running WRITE of `num_bytes`: past Mooncake's own timeout for it, which ends
    every transfer, with 15 s for the notification; at least 60 s plus the per-byte part. Mooncake's timeout is
    MC_TRANSFER_TIMEOUT (seconds) plus a second per GB the transfer moves (MC_TRANSFER_SECONDS_PER_BYTE): a 20 GB
    WRITE (a long prompt of a large model on one rank) may run 20 s past MC_TRANSFER_TIMEOUT. The timeout is the
    one Mooncake itself reads from the value (config/serving_env.py mooncake_transfer_timeout: `120s` is 120 s
    there, not a value to skip for the 30 s default): a shorter wait would let the decode free blocks that a WRITE
    still lands in. check-config and serve refuse such a value; an instance started another way still waits long
    enough."""
    return max(60.0, mooncake_transfer_timeout(environ) + 15.0) + num_bytes * MC_TRANSFER_SECONDS_PER_BYTE


# Mooncake stops a transfer by its own timeout; release() waits this long (for a transfer of no bytes, plus
# MC_TRANSFER_SECONDS_PER_BYTE a byte) for a running one to end before giving up (its blocks then stay with
# whoever drains them). Decode drains a push that much longer than over NIXL (MooncakeAgent.release_wait_seconds
# and release_wait_seconds_per_byte, decode/table.py). Both sides of a deployment start with the launcher's
# environment, so they agree on it.
RELEASE_WAIT_SECONDS = release_wait_seconds(os.environ)


class TransferPool:
    """Threads bound to `device_index` (captured before the transfer engine was created)."""

    def __init__(self, device_index: int, workers: int = 4, name: str = "pdlaunch-mooncake-xfer") -> None:
        self.device_index = device_index
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name,
                                           initializer=self._bind_sender_thread_device)

    def _bind_sender_thread_device(self) -> None:
        platform.set_device(self.device_index)

    def post(self, run: Callable[[], None], num_bytes: int, what: str, wait_on_release: bool) -> MooncakeXfer:
        return MooncakeXfer(self.executor.submit(run), num_bytes, what, wait_on_release)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class MooncakeXfer:
    """One posted transfer; `state()` is "PROC", "DONE" or "ERR" (the XferHandle contract of agent.py)."""

    def __init__(self, future: Future[None], num_bytes: int, what: str, wait_on_release: bool) -> None:
        self._future = future
        self._wait_on_release = wait_on_release
        self.num_bytes = num_bytes
        self.what = what
        self.error: str | None = None

    def state(self) -> str:
        if not self._future.done():
            return "PROC"
        if self._future.cancelled():
            self.error = "cancelled before it started"
            return "ERR"
        exc = self._future.exception()
        if exc is None:
            return "DONE"
        self.error = exc.render() if isinstance(exc, KVTransferError) else f"{type(exc).__name__}: {exc}"
        return "ERR"

    def release(self) -> None:
        """Mooncake cannot cancel a transfer that runs: one not started is dropped. A running WRITE
        (prefill push sender thread) is waited for, at most `release_wait` (Mooncake's timeout grows with
        its bytes), so that push_failed means nothing more lands in the decode's blocks. A running READ is
        not: the decode keeps the memory it writes until it ended (MooncakeAgent.release_cancels;
        decode/table.py, decode/context.py)."""
        if self._future.cancel() or self._future.done() or not self._wait_on_release:
            return
        wait = self.release_wait
        deadline = time.monotonic() + wait
        while not self._future.done() and time.monotonic() < deadline:
            time.sleep(0.001)
        if not self._future.done():
            logger.error("Mooncake %s of %d bytes still runs %.0fs after it was released", self.what,
                         self.num_bytes, wait)

    @property
    def release_wait(self) -> float:
        """How long release() waits for this transfer when it runs: RELEASE_WAIT_SECONDS and its bytes' part."""
        return RELEASE_WAIT_SECONDS + self.num_bytes * MC_TRANSFER_SECONDS_PER_BYTE
