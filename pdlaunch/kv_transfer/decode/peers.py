"""Decode side: the prefill engines it has shaken hands with, cached per engine_id.

One handshake per remote engine (concurrent loads for the same engine wait for the first one); a
failed handshake is not cached, so the next request tries again. A load that ends while it waits (its
client left, its deadline passed) stops waiting within client.STOP_POLL_SECONDS (`get`'s `stopped`), for
its handshake's answer as for another load's handshake with that engine, and frees its loader thread
(before, it sat out the handshake timeout, 10 s by default). Not given up: the TCP connect (bounded by
the handshake timeout; refused at once on a live host) and the listen request that follows an answered
handshake (quick, and the handshake is cached with it). A prefill engine that died is
forgotten when its launcher asks (`forget_engine`, before it restarts the instance): its NIXL agent
goes, and with it our mapping of its memory, which would keep that memory allocated on its GPU.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.auth import SideChannelKeys
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.handshake import DeviceInfo, HandshakeInfo, check_compatible, check_layout
from pdlaunch.kv_transfer.messages import DecodeLayout, HandshakeAnswer, HandshakeRequest, ListenAnswer, ListenRequest
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.side_channel import client
from pdlaunch.kv_transfer.side_channel.client import STOP_POLL_SECONDS
from pdlaunch.kv_transfer.transfer_mode import resolve_transfer_mode
from pdlaunch.kv_transfer.transport import TransferAgent

logger = logging.getLogger(__name__)


@dataclass
class RemoteEngine:
    info: HandshakeInfo
    agent_name: str  # its NIXL agent, loaded into ours
    mode: str  # "pull" | "push"
    reason: str
    address: tuple[str, int] = ("", 0)  # its side channel


class PeerCache:
    def __init__(self, agent: TransferAgent, spec: Callable[[], KVCacheSpec], local_device: Callable[[], DeviceInfo],
                 transfer_mode: str, handshake_timeout: float, keys: SideChannelKeys, reader: str) -> None:
        self.agent, self.keys, self._spec, self._local_device = agent, keys, spec, local_device
        self.reader = reader  # this decode's engine id: prefills keep it with our agent (forget_engine there)
        self.transfer_mode = transfer_mode  # kv_transfer.transfer_mode: pull | push | auto (per engine)
        self.handshake_timeout = handshake_timeout
        self._remotes: dict[str, RemoteEngine] = {}
        self._locks: dict[str, threading.Lock] = {}
        # Side channels of the prefill engines this decode handed its memory to for a push: each holds
        # that metadata (and, on CUDA, a mapping of our staging buffer) until we ask it to forget. Kept
        # apart from _remotes, which loses an engine when that engine goes to sleep first.
        self._pushers: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()

    def snapshot(self) -> dict[str, RemoteEngine]:
        with self._lock:
            return dict(self._remotes)

    def take_pushers(self) -> dict[tuple[str, int], str]:
        """Side-channel address -> engine_id of every prefill engine shaken hands with in push mode
        since the last call; the list starts empty again."""
        with self._lock:
            pushers, self._pushers = self._pushers, {}
        return pushers

    def forget_all(self) -> None:
        """Drop every prefill engine's metadata (this decode goes to sleep): UCX closes the mappings it
        opened of their memory when the keys go, and a mapping keeps the mapped buffer allocated and
        counted to this process. The next load shakes hands again."""
        with self._lock:
            remotes = list(self._remotes.values())
            self._remotes.clear()
            self._locks.clear()
        for remote in remotes:
            self.agent.forget_remote(remote.agent_name)

    def forget_agent(self, agent_name: str, kv_epoch: int | None = None) -> None:
        """Drop one prefill agent's metadata of `kv_epoch` (None: any): it is going to sleep and asked
        for it; the next load from that engine shakes hands again. A notification that arrives late,
        after a handshake with the woken engine loaded its newer metadata, leaves that alone."""
        suffix = None if kv_epoch is None else f"@{kv_epoch}"
        with self._lock:
            keys = [key for key, remote in self._remotes.items()
                    if remote.agent_name == agent_name and (suffix is None or key.endswith(suffix))]
            for key in keys:
                del self._remotes[key]
            still_used = any(remote.agent_name == agent_name for remote in self._remotes.values())
        if keys and not still_used:
            self.agent.forget_remote(agent_name)
            logger.info("dropped the NIXL metadata of prefill agent %s (it goes to sleep)", agent_name)

    def forget_engine(self, engine_id: str) -> int:
        """Drop every entry of prefill engine `engine_id` (every rank and epoch; it died and its launcher restarts
        it with a new engine_id) and the NIXL agents no other entry uses; returns how many agents went. A load
        from that engine in flight fails as it would anyway; loads from other engines go on."""
        with self._lock:
            keys = [key for key, remote in self._remotes.items() if remote.info.engine_id == engine_id]
            gone = {self._remotes.pop(key).agent_name for key in keys}
            for key in keys:
                self._locks.pop(key, None)
            gone -= {remote.agent_name for remote in self._remotes.values()}
            self._pushers = {address: eid for address, eid in self._pushers.items() if eid != engine_id}
        for name in sorted(gone):
            self.agent.forget_remote(name)
            logger.info("dropped the NIXL metadata of prefill agent %s: its engine %s ended", name, engine_id)
        return len(gone)

    def get(self, remote: RemoteKV, stopped: Callable[[], bool] | None = None) -> RemoteEngine:
        """The prefill engine (rank) `remote` names, shaking hands on first use. `stopped` (the load ended): asked
        while this waits for a handshake's answer, or for another load's handshake with the engine; True gives up
        (KVTransferError) and leaves the engine to the next load."""
        engine_id, rank = remote.engine_id, remote.tp_rank
        # A resharding load talks to several ranks of one prefill engine: one entry per rank.
        key = engine_id if rank is None else f"{engine_id}/rank{rank}"
        # A prefill engine that registered its KV again (woke up) has new agent metadata.
        key += f"@{remote.kv_epoch}"
        with self._lock:
            cached = self._remotes.get(key)
            lock = self._locks.setdefault(key, threading.Lock())
        if cached is not None:
            return cached
        while not lock.acquire(timeout=STOP_POLL_SECONDS):
            if stopped is not None and stopped():
                raise KVTransferError(f"gave up waiting for the KV handshake with {remote.where} (its load ended)")
        try:
            with self._lock:
                cached = self._remotes.get(key)
            if cached is None:
                cached = self._handshake(engine_id, remote.host, remote.port, rank, stopped)
                with self._lock:
                    stale = [k for k, r in self._remotes.items()
                             if r.address == cached.address and r.info.engine_id != engine_id]
                    gone = {self._remotes.pop(k).agent_name for k in stale}
                    for k in stale:
                        self._locks.pop(k, None)
                    self._remotes[key] = cached
                    gone -= {r.agent_name for r in self._remotes.values()}
                    if cached.mode == "push":
                        self._pushers[cached.address] = engine_id
                for name in gone:  # the engine that served this address before restarted as engine_id
                    self.agent.forget_remote(name)
                    logger.info("dropped the NIXL metadata of %s: %s:%d now serves prefill engine %s",
                                name, *cached.address, engine_id)
            return cached
        finally:
            lock.release()

    def _handshake(self, engine_id: str, host: str, port: int, rank: int | None = None,
                   stopped: Callable[[], bool] | None = None) -> RemoteEngine:
        spec = self._spec()
        # Our KV heads split: the prefill rank counts our ranks' read_done/release against the plan it implies.
        layout = DecodeLayout(reader=self.reader, tp_size=spec.tp_size, kv_heads_per_rank=spec.num_kv_heads)
        message = HandshakeRequest(type="handshake", engine_id=engine_id, decode=layout)
        what = f"KV handshake with prefill engine {engine_id}"
        info = client.request(host, port, message, HandshakeAnswer, self.handshake_timeout, what, self.keys,
                              stopped=stopped).info
        if info.engine_id != engine_id:
            raise KVTransferError(
                f"engine_id mismatch: kv_transfer_params name prefill engine {engine_id}, but the side "
                f"channel at {host}:{port} answers as engine {info.engine_id}",
                field="kv_transfer.engine_id",
                hint="the params came from another prefill instance, or that port now belongs to a "
                "restarted one; every TP rank of an instance must share one engine_id (sync_engine_id)",
            )
        if rank is not None and info.tp_rank != rank:
            raise KVTransferError(f"the side channel at {host}:{port} is TP rank {info.tp_rank} of prefill engine "
                                  f"{engine_id}, not rank {rank}",
                                  hint="the prefill instance restarted or its ports moved; retry the request")
        check_compatible(spec, info, reshard=rank is not None)
        where = f"prefill engine {engine_id} at {host}:{port}" + ("" if rank is None else f" (TP rank {rank})")
        check_layout(spec, info, where, reshard=rank is not None)
        self.agent.forget_remote(info.agent_name)  # stale metadata of an earlier epoch
        agent_name = self.agent.add_remote(bytes.fromhex(info.agent_metadata))
        mode, reason = resolve_transfer_mode(self.transfer_mode, self._local_device(), info.device)
        logger.info("KV transfer with prefill engine %s (%s:%d): %s, because %s", engine_id, host, port, mode, reason)
        if mode == "pull":
            self._listen(engine_id, host, port)
        return RemoteEngine(info, agent_name, mode, reason, (host, port))

    def _listen(self, engine_id: str, host: str, port: int) -> None:
        """Give a prefill we READ from our connection info (no memory), so that it can tell us to drop
        its metadata when it goes to sleep: our mapping of its memory would keep that allocated. Only
        that release depends on it, so a failure is logged and the load goes on."""
        try:
            message = ListenRequest(type="listen", agent_name=self.agent.name,
                                    agent_metadata=self.agent.connection_metadata().hex(), reader=self.reader)
            client.request(host, port, message, ListenAnswer, self.handshake_timeout,
                           f"giving prefill engine {engine_id} our connection info", self.keys)
        except KVTransferError as exc:
            logger.warning("%s; if it sleeps, its freed KV memory stays mapped here until our next handshake", exc)
