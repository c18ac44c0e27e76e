"""The prefill role of the NIXL connector (nixl_connector.py holds the agent and the KV memory): holds
and leases (prefill/holds.py; one hold and how it ends: prefill/hold.py), the push sender pool
(prefill/push_sender.py), the staging server (prefill/staging_server.py), the decode agents it knows
(prefill/decode_peers.py), and the authenticated side channel that serves them to decode engines.

The side channel listens on instance.side_channel_port (+ tp_rank); a decode connects to it with the
kv_transfer_params this side answered (`request_finished`).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import ConnectorInfo, KVCacheSpec, KVConnectorEvents
from pdlaunch.kv_transfer.checksum import block_checksums
from pdlaunch.kv_transfer.handshake import KV_LAYOUT, HandshakeInfo, compat_fields, compat_hash, device_info
from pdlaunch.kv_transfer.messages import (
    Empty,
    HandshakeAnswer,
    HandshakeRequest,
    HeldBlocksAnswer,
    HeldBlocksRequest,
    PushRequest,
)
from pdlaunch.kv_transfer.nixl_connector import NixlConnector
from pdlaunch.kv_transfer.notifications import ReadDone
from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer, wants_remote_decode
from pdlaunch.kv_transfer.prefill.decode_peers import DecodePeers
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.push_sender import PushSender, PushTiming
from pdlaunch.kv_transfer.prefill.staging_server import StagingServer
from pdlaunch.kv_transfer.push_params import prompt_digest
from pdlaunch.kv_transfer.side_channel.server import SideChannelServer
from pdlaunch.kv_transfer.staging import StagingArea
from pdlaunch.memory import platform
from pdlaunch.metrics.kv_transfer import KV_DEAD_READER_FREES

logger = logging.getLogger(__name__)

class PrefillSide(NixlConnector):
    def __init__(self, config: DeploymentConfig, instance: InstanceSpec, staging_bytes: int | None = None,
                 workers: int = 2) -> None:
        super().__init__(config, instance, staging_bytes)
        kv = self.kv
        self.instance_host = instance.host  # where decode engines reach this instance
        self.base_port = instance.side_channel_port or kv.side_channel_port or 0  # 0: any free port
        self.answer_mode = self._answer_mode()  # the transfer mode the answer names (vLLM's field; never "auto")
        self.server: SideChannelServer | None = None
        self._handshake: HandshakeInfo | None = None
        # Seed 000: CUDA's current device is per thread; bind it once when each sender thread starts.
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pdlaunch-kv-sender",
                                           initializer=self._bind_sender_thread_device)
        self.holds = HoldTable(kv.kv_lease_seconds)
        self.stager = StagingServer(self.holds, self.executor, kv.transfer_timeout_seconds)
        self.pusher = PushSender(self.agent, self.holds, self.executor, kv.transfer_timeout_seconds)
        self.decodes = DecodePeers(self.agent)

    def _bind_sender_thread_device(self) -> None:
        platform.set_device(self.device_index)

    # -- engine thread ------------------------------------------------------------------------
    @property
    def sender(self) -> PrefillSide:
        return self

    def _attach(self, spec: KVCacheSpec, staging: StagingArea | None, kv_epoch: int) -> None:
        self.stager.spec = self.pusher.spec = spec
        self.stager.staging = self.pusher.staging = staging
        self.holds.plans.set_local(spec)  # before the first handshake is answered: decodes' plans are against it
        self._handshake = self._handshake_info(spec, staging)
        if self.server is not None:
            return
        port = self.base_port + spec.tp_rank if self.base_port else 0
        self.server = SideChannelServer(
            self.kv.side_channel_host, port,
            {"handshake": self._on_handshake, "push": self._on_push, "stage": self.stager.stage,
             "unstage": self.stager.unstage, "claim_read": self.holds.claim_read,
             "cancel_push": self.holds.cancel_push, "release": self.holds.on_release, "forget": self.decodes.forget,
             "listen": self.decodes.listen, "held_blocks": self._on_held_blocks,
             "drop_held": self.holds.drop_held},
            self.keys,
        )
        logger.info("KV side channel of prefill engine %s (tp rank %d) on %s:%d", self.engine_id, spec.tp_rank,
                    self.kv.side_channel_host, self.server.port)

    def _drop_staging(self) -> None:
        self.stager.staging = self.pusher.staging = None

    def _handshake_info(self, spec: KVCacheSpec, staging: StagingArea | None) -> HandshakeInfo:
        fields = compat_fields(spec)
        registered = staging.buffers if staging is not None else spec.kv_caches
        return HandshakeInfo(
            engine_id=self.engine_id, agent_name=self.agent.name, agent_metadata=self.agent.metadata().hex(),
            base_addrs=[t.data_ptr() for t in registered], block_bytes=spec.block_bytes,
            num_blocks=spec.num_blocks, block_size=spec.block_size, dtype=str(fields["dtype"]), kv_layout=KV_LAYOUT,
            num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, group_layers=spec.group_layers,
            model_name=spec.model_name, tp_size=spec.tp_size, tp_rank=spec.tp_rank, device=device_info(spec.device),
            compat_hash=compat_hash(fields), staging_slots=staging.num_slots if staging is not None else 0,
            kv_cache_dtype=str(fields["kv_cache_dtype"]), kv_scales=spec.kv_scales,
        )

    def request_finished(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: KVTransferParams | None,
                         block_ids: list[list[int]]) -> tuple[bool, PrefillAnswer | None]:
        """Hold the blocks of a request asked for a remote decode; answer where its KV lies (vLLM's
        field names; the caller signs the answer)."""
        if not wants_remote_decode(kv_transfer_params):
            return False, None
        spec = self._require_spec()
        host, port = self.address()
        answer = PrefillAnswer(
            do_remote_prefill=True, do_remote_decode=False, remote_engine_id=self.engine_id,
            remote_block_ids=[list(b) for b in block_ids], remote_host=host, remote_port=port,
            remote_request_id=request_id, tp_size=spec.tp_size, kv_heads_per_rank=spec.num_kv_heads,
            transfer_mode=self.answer_mode, num_prompt_tokens=len(prompt_token_ids),
            remote_num_tokens=len(prompt_token_ids),
            remote_blocks_expiry_time=time.time() + self.kv.kv_lease_seconds,  # unix seconds, as vLLM
            kv_epoch=self.kv_epoch,
            kv_checksum=[block_checksums(spec.kv_caches[g], b) for g, b in enumerate(block_ids)]
            if self.kv.verify_kv else None,
        )
        self.holds.hold(request_id, block_ids, prompt_digest(prompt_token_ids))
        return True, answer

    def get_finished(self) -> KVConnectorEvents:
        """Held requests whose blocks may be freed now (read, released, or past their lease)."""
        if self.spec is None:
            return KVConnectorEvents()
        for notif in self._notifications():
            if isinstance(notif, ReadDone):  # a decode READ the blocks, or gave up (release)
                self.holds.on_read_done(notif)
        now = time.monotonic()
        self.stager.expire(now)
        return KVConnectorEvents(finished_sending=self.holds.poll(now))

    def release_held(self, request_id: str) -> bool:
        return self.holds.release(request_id)

    def _forget_peers(self, kv_epoch: int) -> None:
        self.decodes.tell_to_forget(kv_epoch)

    def forget_engine(self, engine_id: str) -> int:
        """A decode engine died: end its part in every hold it was at (its READ claims, staged pulls and pushes:
        prefill/holds.py), so that a hold no other decode is at frees its blocks at the next `get_finished` rather
        than at its lease or claim's cap; drop its queued pushes and the staging slots it read; then its agents
        (prefill/decode_peers.py), so that our mapping of its memory goes. Returns how many agents went."""
        took = self.holds.forget_engine(engine_id)  # first: its pushes and staging copies see it ended and stop
        dropped = self.pusher.drop_queued(engine_id)
        slots = self.stager.forget_engine(engine_id)
        if took or slots:
            kept = [r for r in took if (hold := self.holds.get(r)) is not None and not hold.done]
            KV_DEAD_READER_FREES.inc(len(took) - len(kept))
            logger.info("decode engine %s ended: of the %d held request(s) it was at, %d freed (%d queued push(es) "
                        "to it dropped, %d staging slot(s) it read released), %d kept until another decode, or a "
                        "WRITE to it still running, is through with them", engine_id, len(took),
                        len(took) - len(kept), dropped, slots, len(kept))
        return self.decodes.forget_engine(engine_id)

    def staging_users(self) -> set[str]:
        """Stagings not yet unstaged, and holds a push or staging copy is reading."""
        return self.stager.users() | self.holds.busy_ids()

    def num_held(self) -> int:
        return len(self.holds)

    def push_timings(self) -> list[PushTiming]:
        """The phases of the last (at most 256) pushes that completed, oldest first."""
        return self.pusher.timings()

    @property
    def side_channel_port(self) -> int:
        return self.server.port if self.server is not None else 0

    def address(self) -> tuple[str, int]:
        """Where decode engines reach this side channel (the instance's host when it binds every address)."""
        host = self.kv.side_channel_host
        return (self.instance_host if host in ("", "0.0.0.0", "::") else host), self.side_channel_port

    def _role_info(self, info: ConnectorInfo) -> None:
        if self.server is not None:
            host, port = self.address()
            info["side_channel"] = f"{host}:{port}"
            info["held_requests"] = self.num_held()
            info["decode_engines"] = list(self.decodes.engines())  # whose agents are loaded here

    # -- side-channel threads -----------------------------------------------------------------
    def _on_handshake(self, message: HandshakeRequest) -> HandshakeAnswer:
        """Answers this rank's KV layout, and keeps the decode's (prefill/reader_plans.py): how many of its ranks
        notify this one per request follows from it."""
        if self._handshake is None:
            raise KVTransferError("this prefill engine has not registered its KV cache yet")
        self.holds.plans.learn(message.decode)
        return HandshakeAnswer(info=self._handshake)

    def _on_push(self, message: PushRequest) -> Empty:
        """Decode asks: WRITE held blocks into its blocks (or staging slots), then notify it (its nonce).
        message.runs[g] = [(decode_start, prefill_start, count), ...]; `last` marks the request's final chunk."""
        received = time.monotonic()
        hold = self.holds.claim_push(message, self.spec,
                                     wait=min(message.deadline_in, self.kv.transfer_timeout_seconds))
        if hold is None:  # sent again (the answer to the first copy was lost): that one is queued already
            return Empty()
        try:
            peer = self.decodes.peer(message.agent_name, message.agent_metadata, message.reader)
            self.pusher.submit(hold, message, peer, received)
        except Exception:
            self.holds.forget_push(message.nonce)
            self.holds.unclaim_push(hold, message)
            raise
        return Empty()

    def _on_held_blocks(self, message: HeldBlocksRequest) -> HeldBlocksAnswer:
        """A decode holding push params without block ids (vLLM's push proxy) asks which blocks hold
        its request: found by request id, else by the client's X-Request-Id, and only when the held
        prompt's digest is the decode's (push_params.py). Waits for the hold up to `wait` seconds
        (capped by the transfer timeout): the decode leg may arrive before the prefill finished. Not held by
        then: an answer without a request id (the decode asks again while its load has time left)."""
        deadline = time.monotonic() + min(message.wait, self.kv.transfer_timeout_seconds)
        self.holds.asked((message.request_id, message.client_request_id, message.prompt_digest))
        while True:
            found = self.holds.find(message.request_id, message.client_request_id, message.prompt_digest)
            if found is not None:
                return HeldBlocksAnswer(request_id=found[0], block_ids=found[1], kv_epoch=self.kv_epoch)
            if time.monotonic() >= deadline:
                return HeldBlocksAnswer(request_id=None, block_ids=[], kv_epoch=self.kv_epoch)
            time.sleep(0.005)

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        self.executor.shutdown(wait=True, cancel_futures=True)
        super().shutdown()
