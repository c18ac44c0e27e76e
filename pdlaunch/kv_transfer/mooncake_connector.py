"""MooncakeConnector: KV moves between a prefill and a decode engine through Mooncake's TransferEngine.

The system SGLang (its default PD backend) and vLLM's MooncakeConnector use. Everything above the
bytes is the NIXL connector's, reused by inheritance: the signed kv_transfer_params, the authenticated
side channel (handshake, push requests, claims, cancels), holds and leases, verify_kv, staging,
resharding between TP sizes (pull), metrics and sleep. Only the agent differs (mooncake_agent.py).

Push (kv_transfer.transfer_mode auto or push, Mooncake's native pattern): the decode allocates its
blocks and announces them in a push request on the authenticated side channel; the prefill's sender
pool WRITEs them with the transfer engine and a signed push_done notification tells the decode they
landed. Pull (transfer_mode pull, and always when P and D TP sizes differ): the decode claims the
hold, READs, and notifies read_done. Peers find each other by P2P handshake (the session id travels
in the authenticated handshake), or through kv_transfer.mooncake_metadata_server on clusters.

Trust: Mooncake's transfer engine authenticates no peer, and 0.3.13 listens on every interface
whatever host it is given (measured with `ss -ltnp`: its handshake RPC on 0.0.0.0, its TCP data port
on *; MC_TCP_BIND_ADDRESS did not change that). A process that reaches those ports can learn the
registered addresses from the handshake and read or write registered KV memory. Our notifications are
MACed, so a forged one is dropped, and kv_transfer_params and side-channel messages stay authenticated;
but where the network or local users are not trusted, firewall Mooncake's ports or use the NIXL
connector (its memory keys go to authenticated peers only, and UCX binds loopback on one host).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from pdlaunch.config.models import DeploymentConfig, InstanceSpec
from pdlaunch.config.mooncake_install import resolve_protocol
from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.auth import RateLimitedWarning, SideChannelKeys, require_secret
from pdlaunch.kv_transfer.mooncake_agent import MooncakeAgent
from pdlaunch.kv_transfer.mooncake_engine import MooncakeEngine
from pdlaunch.kv_transfer.mooncake_sender import TransferPool
from pdlaunch.kv_transfer.nixl_connector import NixlConnector
from pdlaunch.kv_transfer.nixl_receiver import DecodeSide
from pdlaunch.kv_transfer.nixl_sender import PrefillSide
from pdlaunch.kv_transfer.peers import PeerCache, RemoteEngine
from pdlaunch.memory import platform

logger = logging.getLogger(__name__)

_NATIVE = "auto: Mooncake's native pattern (vLLM, SGLang): the prefill WRITEs into blocks the decode announced"


class MooncakePeerCache(PeerCache):
    """transfer_mode auto: push with each prefill engine of this decode's TP size (Mooncake's native
    pattern); resharding loads (one handshake per prefill rank) keep the NIXL rules, which pick pull
    where the decode can READ (resharding reads whole prefill blocks)."""

    def _handshake(self, engine_id: str, host: str, port: int, rank: int | None = None) -> RemoteEngine:
        remote = super()._handshake(engine_id, host, port, rank)
        if self.transfer_mode != "auto" or rank is not None or remote.mode == "push":
            return remote
        logger.info("KV transfer with prefill engine %s (%s:%d): push, because %s", engine_id, host, port, _NATIVE)
        return RemoteEngine(remote.info, remote.agent_name, "push", _NATIVE, remote.address)


class MooncakeConnector(NixlConnector):
    def __init__(self, config: DeploymentConfig, instance: InstanceSpec, staging_bytes: int | None = None) -> None:
        if instance.role not in ("prefill", "decode"):
            raise KVTransferError(f"a Mooncake connector serves prefill or decode instances, not {instance.role!r}",
                                  field="role")
        self.config = config
        self.kv = config.kv_transfer
        self.instance = instance
        self.role = instance.role
        self.engine_id = instance.engine_id
        secret = require_secret(config.security.deployment_secret, "the Mooncake KV connector")
        self.keys = SideChannelKeys.from_secret(secret)
        self._bad_notif = RateLimitedWarning(logger)
        # Seed 000: capture the device before the transfer engine exists (it may change the current
        # device while initialising) and bind it; every transfer thread binds this index once.
        self.device_index = platform.current_device_index()
        platform.set_device(self.device_index)
        self.protocol, self.protocol_reason = resolve_protocol(self.kv.mooncake_protocol)
        host = self.kv.side_channel_host
        if host in ("", "0.0.0.0", "::"):
            host = instance.host
        self.transfer_engine = MooncakeEngine(host, self.protocol, self.kv.mooncake_metadata_server)
        self.transfer_pool = TransferPool(self.device_index)
        name = f"pdlaunch-{self.role}-{self.engine_id[:12]}-{uuid.uuid4().hex[:8]}"
        self.agent = MooncakeAgent(name, self.transfer_engine, self.transfer_pool, secret)  # type: ignore[assignment]
        self.spec = None
        self.kv_epoch = 0
        self.staging_bytes = staging_bytes
        self.staging = None
        self._slept_staging_bytes = 0
        self.server = None
        self._local_device = None
        self._handshake = None
        self.sender: PrefillSide | None = None
        self.receiver: DecodeSide | None = None
        if self.role == "prefill":
            self.sender = PrefillSide(self.agent, self.kv.kv_lease_seconds,  # type: ignore[arg-type]
                                      self.kv.transfer_timeout_seconds, self.device_index)
        else:
            self.receiver = DecodeSide(
                self.agent, self._require_spec, self._device, self.kv.transfer_mode,  # type: ignore[arg-type]
                self.kv.handshake_timeout_seconds, self.kv.transfer_timeout_seconds, self.kv.verify_kv,
                self.keys, self.device_index,
            )
            self.receiver.peers = MooncakePeerCache(
                self.agent, self._require_spec, self._device, self.kv.transfer_mode,  # type: ignore[arg-type]
                self.kv.handshake_timeout_seconds, self.keys)
        self._mode, self._mode_reason = self._initial_mode()
        logger.info("Mooncake connector (%s, engine %s): transport %s (%s), metadata %s, session %s; "
                    "transfer mode %s: %s", self.role, self.engine_id, self.protocol, self.protocol_reason,
                    self._metadata_text(), self.transfer_engine.session_id, self._mode, self._mode_reason)
        logger.warning("Mooncake's transfer engine listens on all interfaces and authenticates no peer: a host "
                       "that reaches its ports (session %s) can read or write this engine's registered KV memory; "
                       "firewall them, or use --kv-connector nixl where the network is not trusted",
                       self.transfer_engine.session_id)

    def _initial_mode(self) -> tuple[str, str]:
        if self.role == "prefill":
            return self.kv.transfer_mode, "prefill serves both: decode READs (pull) or asks for a WRITE (push)"
        if self.kv.transfer_mode == "auto":
            return "push", _NATIVE + " (loads that reshard between TP sizes pull)"
        return self.kv.transfer_mode, f"kv_transfer.transfer_mode is {self.kv.transfer_mode}"

    def _metadata_text(self) -> str:
        server = self.kv.mooncake_metadata_server
        return f"server {server}" if server else "P2P handshake (no metadata server)"

    def before_sleep(self) -> None:
        """The NIXL connector's checks and peer forgetting, then deregister whatever is registered: a
        staging buffer (the parent frees it) or the KV cache itself, whose memory sleep releases.
        `register_kv_caches` after the wake-up registers it again (kv_epoch grows)."""
        direct = self.staging is None  # else the parent deregisters and frees the staging buffer
        super().before_sleep()
        if direct and self.spec is not None:
            self.agent.deregister()
            logger.info("KV cache deregistered from Mooncake before sleep")

    def info(self) -> dict[str, Any]:
        info = super().info()
        info.update(connector="mooncake", transport=self.protocol, transport_reason=self.protocol_reason,
                    session=self.transfer_engine.session_id, metadata=self._metadata_text(),
                    data_plane_auth="none: Mooncake listens on all interfaces; firewall its ports")
        return info
