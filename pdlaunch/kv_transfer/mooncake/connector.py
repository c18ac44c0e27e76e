"""MooncakeConnector: KV moves between a prefill and a decode engine through Mooncake's TransferEngine.

The system SGLang (its default PD backend) and vLLM's MooncakeConnector use. Everything above the
bytes is the NIXL connector's, reused by inheritance (MooncakePrefill, MooncakeDecode): the signed
kv_transfer_params, the authenticated side channel (handshake, push requests, claims, cancels), holds
and leases, verify_kv, staging, resharding between TP sizes (pull), metrics and sleep. Only the agent
differs (mooncake/agent.py).

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
from collections.abc import Callable

from pdlaunch.config.mooncake_install import resolve_protocol
from pdlaunch.kv_transfer.base import ConnectorInfo
from pdlaunch.kv_transfer.decode.peers import PeerCache, RemoteEngine
from pdlaunch.kv_transfer.decode.side import DecodeSide
from pdlaunch.kv_transfer.mooncake.agent import MooncakeAgent
from pdlaunch.kv_transfer.mooncake.engine import MooncakeEngine
from pdlaunch.kv_transfer.mooncake.sender import TransferPool
from pdlaunch.kv_transfer.nixl_connector import AnswerMode, NixlConnector
from pdlaunch.kv_transfer.prefill.side import PrefillSide
from pdlaunch.kv_transfer.transport import TransferAgent

logger = logging.getLogger(__name__)

_NATIVE = "auto: Mooncake's native pattern (vLLM, SGLang): the prefill WRITEs into blocks the decode announced"


class MooncakePeerCache(PeerCache):
    """transfer_mode auto: push with each prefill engine of this decode's TP size (Mooncake's native
    pattern); resharding loads (one handshake per prefill rank) keep the NIXL rules, which pick pull
    where the decode can READ (resharding reads whole prefill blocks)."""

    def _handshake(self, engine_id: str, host: str, port: int, rank: int | None = None,
                   stopped: Callable[[], bool] | None = None) -> RemoteEngine:
        remote = super()._handshake(engine_id, host, port, rank, stopped)
        if self.transfer_mode != "auto" or rank is not None or remote.mode == "push":
            return remote
        logger.info("KV transfer with prefill engine %s (%s:%d): push, because %s", engine_id, host, port, _NATIVE)
        return RemoteEngine(remote.info, remote.agent_name, "push", _NATIVE, remote.address)


class MooncakeConnector(NixlConnector):
    """What both Mooncake roles change in the NIXL connector: a Mooncake agent (`_make_agent`) and
    Mooncake's push-first peers. MooncakePrefill and MooncakeDecode (below) are the connectors."""

    name = "mooncake"
    title = "Mooncake"
    peer_cache = MooncakePeerCache

    def _make_agent(self, name: str) -> TransferAgent:
        self.protocol, self.protocol_reason = resolve_protocol(self.kv.mooncake_protocol)
        host = self.kv.side_channel_host
        if host in ("", "0.0.0.0", "::"):
            host = self.instance.host
        self.transfer_engine = MooncakeEngine(host, self.protocol, self.kv.mooncake_metadata_server)
        self.transfer_pool = TransferPool(self.device_index)
        logger.info("Mooncake transport %s (%s), metadata %s, session %s", self.protocol, self.protocol_reason,
                    self._metadata_text(), self.transfer_engine.session_id)
        logger.warning("Mooncake's transfer engine listens on all interfaces and authenticates no peer: a host "
                       "that reaches its ports (session %s) can read or write this engine's registered KV memory; "
                       "firewall them, or use --kv-connector nixl where the network is not trusted",
                       self.transfer_engine.session_id)
        return MooncakeAgent(name, self.transfer_engine, self.transfer_pool, self.secret)

    def _initial_mode(self) -> tuple[str, str]:
        if self.role == "decode" and self.kv.transfer_mode == "auto":
            return "push", _NATIVE + " (loads that reshard between TP sizes pull)"
        return super()._initial_mode()

    def _answer_mode(self) -> AnswerMode:
        """auto pushes (pulls only to reshard between TP sizes)."""
        return "push" if self.kv.transfer_mode == "auto" else self.kv.transfer_mode

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

    def info(self) -> ConnectorInfo:
        info = super().info()
        info.update(transport=self.protocol, transport_reason=self.protocol_reason,
                    session=self.transfer_engine.session_id, metadata=self._metadata_text(),
                    data_plane_auth="none: Mooncake listens on all interfaces; firewall its ports")
        return info


class MooncakePrefill(MooncakeConnector, PrefillSide):
    """The prefill role (prefill/side.py) over Mooncake."""


class MooncakeDecode(MooncakeConnector, DecodeSide):
    """The decode role (decode/side.py) over Mooncake."""
