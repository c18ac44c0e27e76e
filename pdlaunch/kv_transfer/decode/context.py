"""What every load strategy of the decode side shares: the agent, the prefill side channels, a load's
remaining time, the staging buffer, and the lock that guards every Load's fields."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer import side_channel
from pdlaunch.kv_transfer.auth import SideChannelKeys
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.decode.load import Load
from pdlaunch.kv_transfer.decode.peers import PeerCache
from pdlaunch.kv_transfer.messages import Notification, SideChannelRequest, encode_notification
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.side_channel import Connections, Reply
from pdlaunch.kv_transfer.staging import StagingArea
from pdlaunch.kv_transfer.transport import TransferAgent


@dataclass
class LoadContext:
    agent: TransferAgent
    spec: Callable[[], KVCacheSpec]
    peers: PeerCache
    keys: SideChannelKeys
    handshake_timeout: float
    transfer_timeout: float
    verify_kv: bool
    executor: ThreadPoolExecutor  # the loader threads (they bind the instance's device when they start)
    staging: StagingArea | None = None  # this side's staging buffer (staging.py), None: direct
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Side-channel connections kept open between requests (push, claim_read, cancel_push, ...): a fresh
    # connection per request cost ~0.4 ms of every load's latency (TCP connect + a server thread).
    connections: Connections = field(default_factory=Connections)

    def remaining(self, load: Load, what: str) -> float:
        """Seconds left before the load's deadline; KVTransferError when none are left or it was aborted."""
        remaining = load.deadline - time.monotonic()
        if remaining <= 0 or load.abandoned:
            raise KVTransferError(
                f"KV of request {load.request_id} did not arrive within {self.transfer_timeout:g}s "
                f"({load.mode} from {load.where}, stage: {what})" if remaining <= 0 else "aborted",
                field="kv_transfer.transfer_timeout_seconds",
            )
        return remaining

    def ask(self, remote: RemoteKV, message: SideChannelRequest, reply: type[Reply], timeout: float,
            what: str) -> Reply:
        """One side-channel request to the prefill rank `remote` names."""
        return side_channel.request(remote.host, remote.port, message, reply, timeout, f"{what} to {remote.where}",
                                    self.keys, self.connections)

    def notify(self, agent_name: str, notif: Notification) -> None:
        self.agent.notify(agent_name, encode_notification(notif))
