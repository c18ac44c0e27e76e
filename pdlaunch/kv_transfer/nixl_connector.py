"""NixlConnector: KV moves between a prefill and a decode engine through NIXL (UCX), pull or push.

One agent per engine process (per TP rank); the KV cache tensors (or a staging buffer) are registered
once, one region per group. The connector owns that memory and the agent, builds the side its role
needs (prefill/side.py: holds, push sender, side channel; decode/side.py: handshakes and loads), and
delegates everything else to it. MooncakeConnector reuses all of it with another agent (`_make_agent`).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

import torch

from pdlaunch.config.models import DeploymentConfig, InstanceSpec
from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.agent import KVAgent
from pdlaunch.kv_transfer.auth import RateLimitedWarning, SideChannelKeys, require_secret
from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnector, KVConnectorEvents
from pdlaunch.kv_transfer.decode.context import LoadContext, loader_pool
from pdlaunch.kv_transfer.decode.peers import PeerCache
from pdlaunch.kv_transfer.decode.side import DecodeSide
from pdlaunch.kv_transfer.handshake import KV_LAYOUT, DeviceInfo, device_info
from pdlaunch.kv_transfer.messages import parse_notification
from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer
from pdlaunch.kv_transfer.prefill.side import AnswerMode, PrefillSide
from pdlaunch.kv_transfer.role import RoleSide
from pdlaunch.kv_transfer.side_channel import SideChannelServer
from pdlaunch.kv_transfer.staging import DEFAULT_STAGING_BYTES, StagingArea
from pdlaunch.kv_transfer.transport import TransferAgent
from pdlaunch.memory import platform

logger = logging.getLogger(__name__)

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def bind_ucx_to_loopback(side_channel_host: str) -> None:
    """One-host deployments (side channel on loopback): UCX's TCP transport listens on loopback only.

    Verified here with nixl 1.5 / UCX on CPU: without it an agent listens on 127.0.0.1 and on the
    host's external address (`ss -ltnp`); with UCX_NET_DEVICES=lo only on 127.0.0.1, and KV still
    moves between processes (shared memory and TCP over lo). UCX reads its environment when the
    agent's UCX backend starts, so this runs before the agent is created. UCX_NET_DEVICES names
    network devices only: shared-memory and CUDA transports (cuda_ipc) are not filtered by it. A
    value the user set is kept (setdefault); multi-node deployments bind the side channel to a
    routable address and keep UCX's default devices."""
    if side_channel_host in _LOOPBACK_HOSTS or side_channel_host.startswith("127."):
        os.environ.setdefault("UCX_NET_DEVICES", "lo")


class NixlConnector(KVConnector):
    """`staging_bytes`: size of the staging buffer KV moves through (0: none, register the KV cache
    itself); default: DEFAULT_STAGING_BYTES on CUDA when the KV cache lives in CuMem pools
    (model.enable_cumem_allocator or enable_sleep_mode), else none."""

    name = "nixl"  # what /info names
    title = "NIXL"  # what messages name
    peer_cache = PeerCache  # how a decode resolves pull or push per prefill engine

    def __init__(self, config: DeploymentConfig, instance: InstanceSpec, staging_bytes: int | None = None) -> None:
        if instance.role not in ("prefill", "decode"):
            raise KVTransferError(f"a {self.title} connector serves prefill or decode instances, not {instance.role!r}",
                                  field="role")
        self.config = config
        self.kv = config.kv_transfer
        self.instance = instance
        self.role = instance.role
        self.engine_id = instance.engine_id
        self.secret = require_secret(config.security.deployment_secret, f"the {self.title} KV connector")
        self.keys = SideChannelKeys.from_secret(self.secret)
        self._bad_notif = RateLimitedWarning(logger)
        # Seed 000: capture the device before the transfer engine exists (it may change the current
        # device while initialising) and bind it; transfer threads bind this index in their initializer.
        self.device_index = platform.current_device_index()
        platform.set_device(self.device_index)
        self.agent = self._make_agent(f"pdlaunch-{self.role}-{self.engine_id[:12]}-{uuid.uuid4().hex[:8]}")
        self.spec: KVCacheSpec | None = None
        self.kv_epoch = 0  # grows each time the KV memory is registered again (after a wake-up)
        self.staging_bytes = staging_bytes
        self.staging: StagingArea | None = None
        self._slept_staging_bytes = 0  # budget of the staging buffer before_sleep dropped (0: none)
        self._local_device: DeviceInfo | None = None
        self.side = self._make_side()
        self._mode, self._mode_reason = self._initial_mode()
        logger.info("%s connector (%s, engine %s): transfer mode %s: %s", self.title, self.role, self.engine_id,
                    self._mode, self._mode_reason)

    def _make_agent(self, name: str) -> TransferAgent:
        """The transport's agent (the hook MooncakeConnector overrides)."""
        if self.config.model.enable_sleep_mode:
            # A mapped buffer stays allocated after its owner frees it, so a sleeping peer's staging
            # buffer must be unmapped here: before_sleep drops the peers' keys, and with UCX's mapping
            # cache on, mappings can outlive the keys (UCX issue 11753).
            os.environ.setdefault("UCX_CUDA_IPC_CACHE", "n")
        bind_ucx_to_loopback(self.kv.side_channel_host)
        return KVAgent(name)

    def _make_side(self) -> RoleSide:
        if self.role == "prefill":
            return PrefillSide(self.agent, self.kv, self.instance, self._answer_mode(), self.keys, self.device_index)
        peers = self.peer_cache(self.agent, self._require_spec, self._device, self.kv.transfer_mode,
                                self.kv.handshake_timeout_seconds, self.keys)
        kv = self.kv
        return DecodeSide(LoadContext(self.agent, self._require_spec, peers, self.keys, kv.handshake_timeout_seconds,
                                      kv.transfer_timeout_seconds, kv.verify_kv, loader_pool(self.device_index)))

    @property
    def sender(self) -> PrefillSide | None:
        """The prefill side (None on a decode instance): for benchmarks and tests."""
        return self.side if isinstance(self.side, PrefillSide) else None

    @property
    def server(self) -> SideChannelServer | None:
        """The prefill side's side-channel server (None on a decode instance, or before registration)."""
        return self.side.server if isinstance(self.side, PrefillSide) else None

    @property
    def receiver(self) -> DecodeSide | None:
        """The decode side (None on a prefill instance): for tests."""
        return self.side if isinstance(self.side, DecodeSide) else None

    def _initial_mode(self) -> tuple[str, str]:
        if self.role == "prefill":
            return self.kv.transfer_mode, "prefill serves both: decode READs (pull) or asks for a WRITE (push)"
        if self.kv.transfer_mode != "auto":
            return self.kv.transfer_mode, f"kv_transfer.transfer_mode is {self.kv.transfer_mode}"
        if self.instance.device == "cpu":
            return "pull", "CPU DRAM on both sides: UCX reads between processes, so decode pulls"
        return "auto", "decided per prefill engine at the first handshake (push unless NVLink joins the GPUs)"

    def _answer_mode(self) -> AnswerMode:
        """The transfer mode a prefill's answer names (vLLM's field; never "auto"): the configured one,
        else what a decode of this deployment resolves: NIXL pulls between CPU processes and pushes
        between GPUs (a decode joined to this GPU by NVLink may still pull: it decides per prefill
        engine)."""
        if self.kv.transfer_mode != "auto":
            return self.kv.transfer_mode
        return "pull" if self.instance.device == "cpu" else "push"

    # -- KV memory ----------------------------------------------------------------------------
    def _staging_budget(self, spec: KVCacheSpec) -> int:
        if self.staging_bytes is not None:
            return self.staging_bytes
        model = self.config.model
        if spec.device.type == "cuda" and (model.enable_cumem_allocator or model.enable_sleep_mode):
            return DEFAULT_STAGING_BYTES
        return 0

    def register_kv_caches(self, spec: KVCacheSpec) -> None:
        if self.spec is not None:
            self._reregister(spec)
            return
        budget = self._staging_budget(spec)
        if budget > 0:
            # Outside any CuMem pool: plain memory that NIXL reaches at full speed (staging.py).
            self.staging = StagingArea(spec.kv_caches, budget)
            logger.info("KV moves through a staging buffer of %d slots (%.0f MiB)", self.staging.num_slots,
                        self.staging.nbytes / 2**20)
        self.agent.register(self.staging.buffers if self.staging is not None else spec.kv_caches)
        self.spec = spec
        self.side.attach(spec, self.staging, self.kv_epoch)

    def _reregister(self, spec: KVCacheSpec) -> None:
        """The engine woke up (sleep mode): same tensors, new physical pages. A staging buffer that
        before_sleep dropped is allocated again with the same budget; KV registered directly is
        registered again. Either way `kv_epoch` grows, so that decode peers shake hands anew. A staging
        buffer kept across the sleep (no before_sleep: sleep never touches it) stays registered."""
        if self._slept_staging_bytes:
            self.staging = StagingArea(spec.kv_caches, self._slept_staging_bytes)
            self._slept_staging_bytes = 0
            self.agent.reregister(self.staging.buffers)
            self.kv_epoch += 1
        elif self.staging is None:
            self.agent.reregister(spec.kv_caches)
            self.kv_epoch += 1
        self.spec = spec
        self.side.attach(spec, self.staging, self.kv_epoch)
        logger.info("KV cache registered again after a wake-up (epoch %d)", self.kv_epoch)

    def before_sleep(self) -> None:
        """Deregister and free the staging buffer (1 GiB by default on CUDA); `_reregister` makes a new
        one after the wake-up. Refused while a transfer holds staging slots: freeing them would pull
        memory from under a NIXL READ/WRITE or a copy.

        Peers drop each other's metadata first (the sides' before_sleep): UCX maps a peer's registered
        GPU memory when it loads the peer's keys and unmaps it when they go, and until then the mapping
        keeps the memory allocated (1 GiB staging buffers; on one H100 a sleeping decode kept 1.1 GiB
        this way). A prefill has no side channel to its decodes: it sends a notification to the decodes
        it pushed to and to those that READ from it, which their engine loops handle within a step."""
        staging = self.staging
        in_use = staging.num_slots - staging.num_free() if staging is not None else 0
        if staging is not None and in_use:
            users = self.side.staging_users()
            raise KVTransferError(
                f"{in_use} of {staging.num_slots} KV staging slots are in use by "
                + (f"request(s) {', '.join(sorted(users))}" if users else "a transfer that is ending"),
                field="sleep",
                hint="sleep once the KV transfers have ended (at most kv_transfer.transfer_timeout_seconds)",
            )
        self.side.before_sleep(self.kv_epoch)
        if staging is None:
            return
        self.agent.deregister()
        self.side.drop_staging()
        self.staging = None
        spec = self._require_spec()
        self._slept_staging_bytes = self._staging_budget(spec)
        nbytes = staging.nbytes
        del staging
        if spec.device.type == "cuda":
            torch.cuda.empty_cache()  # the buffer came from the caching allocator, outside the CuMem pools
        logger.info("KV staging buffer deregistered and freed before sleep (%.0f MiB)", nbytes / 2**20)

    def _require_spec(self) -> KVCacheSpec:
        if self.spec is None:
            raise KVTransferError("the KV cache is not registered yet",
                                  hint="the engine calls register_kv_caches first")
        return self.spec

    def _device(self) -> DeviceInfo:
        if self._local_device is None:
            self._local_device = device_info(self._require_spec().device)
        return self._local_device

    @property
    def side_channel_address(self) -> tuple[str, int]:
        host = self.kv.side_channel_host
        if host in ("", "0.0.0.0", "::"):
            host = self.instance.host
        return host, self.side.side_channel_port

    # -- scheduler side -----------------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
        num_local_computed_tokens: int,
    ) -> int:
        return self.side.num_new_matched_tokens(prompt_token_ids, kv_transfer_params, num_local_computed_tokens)

    def start_load(
        self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
        block_ids: list[list[int]], num_local_computed_tokens: int, num_external_tokens: int,
    ) -> None:
        self.side.start_load(request_id, prompt_token_ids, kv_transfer_params, block_ids, num_local_computed_tokens,
                             num_external_tokens)

    def request_finished(
        self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
        block_ids: list[list[int]],
    ) -> tuple[bool, PrefillAnswer | None]:
        return self.side.request_finished(request_id, prompt_token_ids, kv_transfer_params, block_ids)

    def get_finished(self) -> KVConnectorEvents:
        events = KVConnectorEvents()
        if self.spec is None:
            return events
        for message in self.agent.new_notifs():
            notif = parse_notification(message)
            if notif is None:
                self._bad_notif.warn("notif", "ignoring a malformed notification: %r", message[:200])
            else:
                self.side.on_notif(notif)
        self.side.poll(time.monotonic(), events)
        return events

    def release_held(self, request_id: str) -> bool:
        return self.side.release_held(request_id)

    def abort_load(self, request_id: str) -> bool:
        return self.side.abort_load(request_id)

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "connector": self.name,
            "role": self.role,
            "engine_id": self.engine_id,
            "agent_name": self.agent.name,
            "transfer_mode": self._mode,
            "transfer_mode_reason": self._mode_reason,
            "kv_layout": KV_LAYOUT,
            "staging": {"slots": self.staging.num_slots, "bytes": self.staging.nbytes} if self.staging else None,
        }
        self.side.info(info)
        peers = info.get("peers")
        if self._mode == "auto" and peers:  # a decode: what the first handshake resolved
            first = next(iter(peers.values()))
            info["transfer_mode"], info["transfer_mode_reason"] = first["transfer_mode"], first["reason"]
        return info

    def shutdown(self) -> None:
        self.side.shutdown()
        self.agent.close()
