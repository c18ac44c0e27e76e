"""NixlConnector: KV moves between a prefill and a decode engine through NIXL (UCX), pull or push.

One agent per engine process (per TP rank); the KV cache tensors (or a staging buffer) are registered
once, one region per group. This base owns that memory and the agent, and what both roles share
(registration again after a wake-up, sleep, notifications, /info). Each role is a subclass that
implements the connector interface (base.py) for its part: PrefillSide (prefill/side.py: holds, push
sender, side channel) and DecodeSide (decode/side.py: handshakes and loads); factory.py picks one.
The Mooncake connector (mooncake/connector.py) is the same two classes with another agent.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from typing import Literal

import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.agent import KVAgent
from pdlaunch.kv_transfer.auth import RateLimitedWarning, SideChannelKeys, require_secret
from pdlaunch.kv_transfer.base import ConnectorInfo, KVCacheSpec, KVConnector
from pdlaunch.kv_transfer.decode.peers import PeerCache
from pdlaunch.kv_transfer.decode.table import DRAIN_GRACE_SECONDS
from pdlaunch.kv_transfer.handshake import KV_LAYOUT, DeviceInfo, device_info
from pdlaunch.kv_transfer.notifications import Notification, parse_notification
from pdlaunch.kv_transfer.side_channel.server import SideChannelServer
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


def staging_wait_hint(agent: TransferAgent, transfer_timeout: float, title: str, num_bytes: int) -> str:
    """How long the transfers holding staging slots (`num_bytes` of them) may still hold them (a refused sleep's
    hint). A load's slots go back by its deadline (kv_transfer.transfer_timeout_seconds) plus DRAIN_GRACE_SECONDS
    (a READ ending, a chunk's drain), a prefill's by its ticket's or push's deadline; a transport that cannot cancel
    a running transfer adds its release_wait_seconds and its per-byte part for the bytes in those slots, which bound
    what any one transfer through them moves (Mooncake: past MC_TRANSFER_TIMEOUT plus 1 s per GB, which ends it)."""
    grace = DRAIN_GRACE_SECONDS
    if not agent.release_cancels:  # whole seconds, rounded up: the per-byte part is a fraction of one for 1 GiB
        grace = math.ceil(grace + agent.release_wait_seconds + num_bytes * agent.release_wait_seconds_per_byte)
    hint = (f"sleep once the KV transfers using them have ended: within {transfer_timeout + grace:g}s "
            f"(kv_transfer.transfer_timeout_seconds + {grace:g}s)")
    if agent.release_cancels:
        return hint
    return (f"{hint}; {title} cannot cancel a READ or WRITE that runs, which keeps its slots until it ends (at the "
            "latest at Mooncake's transfer timeout: MC_TRANSFER_TIMEOUT, plus 1 s per GB the transfer moves, here "
            f"at most the {num_bytes / 1e9:.2g} GB of the slots in use)")


AnswerMode = Literal["pull", "push"]  # what a prefill's answer names (vLLM's field; never "auto")


class NixlConnector(KVConnector):
    """The base of both roles (PrefillSide, DecodeSide). `staging_bytes`: size of the staging buffer KV
    moves through (0: none, register the KV cache itself); default: DEFAULT_STAGING_BYTES on CUDA when
    the KV cache lives in CuMem pools (model.enable_cumem_allocator or enable_sleep_mode), else none."""

    name = "nixl"  # what /info names
    title = "NIXL"  # what messages name
    peer_cache = PeerCache  # how a decode resolves pull or push per prefill engine
    server: SideChannelServer | None = None  # a prefill's side channel (None on a decode)

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
        self._mode, self._mode_reason = self._initial_mode()
        logger.info("%s connector (%s, engine %s): transfer mode %s: %s", self.title, self.role, self.engine_id,
                    self._mode, self._mode_reason)

    def _make_agent(self, name: str) -> TransferAgent:
        """The transport's agent (the hook MooncakeConnector overrides). KVAgent turns UCX's CUDA IPC cache
        off (agent.py): a mapping of a sleeping or dead peer's memory must go when its agent is forgotten."""
        bind_ucx_to_loopback(self.kv.side_channel_host)
        return KVAgent(name)

    # -- what a role adds (PrefillSide, DecodeSide) -------------------------------------------
    def _attach(self, spec: KVCacheSpec, staging: StagingArea | None, kv_epoch: int) -> None:  # noqa: B027
        """The KV cache was registered (again, after a wake-up): its spec, the staging buffer KV moves
        through (None: the KV cache itself), and the epoch peers must shake hands with."""

    def _drop_staging(self) -> None:  # noqa: B027 - a role that uses no staging keeps nothing
        """The staging buffer is freed before sleep: stop using it."""

    def staging_users(self) -> set[str]:
        """Request ids that may hold staging slots now."""
        return set()

    def _forget_peers(self, kv_epoch: int) -> None:  # noqa: B027 - a role may map no peer memory
        """Before sleep: ask peers that mapped this engine's memory (or whose memory it mapped) to drop it."""

    def _role_info(self, info: ConnectorInfo) -> None:  # noqa: B027 - nothing more to show
        """Add this role's part of /info to `info`."""

    @property
    def side_channel_port(self) -> int:
        return 0

    @property
    def sender(self) -> NixlConnector | None:
        """The prefill side (None on a decode instance): for benchmarks and tests."""
        return None

    @property
    def receiver(self) -> NixlConnector | None:
        """The decode side (None on a prefill instance): for tests."""
        return None

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
        self._attach(spec, self.staging, self.kv_epoch)

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
        self._attach(spec, self.staging, self.kv_epoch)
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
            users = self.staging_users()
            raise KVTransferError(
                f"{in_use} of {staging.num_slots} KV staging slots are in use by "
                + (f"request(s) {', '.join(sorted(users))}" if users else "a transfer that is ending"),
                field="sleep",
                hint=staging_wait_hint(self.agent, self.kv.transfer_timeout_seconds, self.title,
                                       staging.nbytes * in_use // staging.num_slots),
            )
        self._forget_peers(self.kv_epoch)
        if staging is None:
            return
        self.agent.deregister()
        self._drop_staging()
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
        return host, self.side_channel_port

    # -- engine thread --------------------------------------------------------------------------
    def _notifications(self) -> list[Notification]:
        """Engine thread (each role's get_finished): the notifications the transport received since the
        last call; a malformed one is dropped with a rate-limited warning. Each role handles its kinds
        and ignores the others."""
        notifs = []
        for message in self.agent.new_notifs():
            notif = parse_notification(message)
            if notif is None:
                self._bad_notif.warn("notif", "ignoring a malformed notification: %r", message[:200])
            else:
                notifs.append(notif)
        return notifs

    def _resolved_mode(self) -> tuple[str, str] | None:
        """A decode in transfer mode auto: what its first handshake resolved (None: not yet, or not auto)."""
        return None

    def info(self) -> ConnectorInfo:
        info: ConnectorInfo = {
            "connector": self.name,
            "role": self.role,
            "engine_id": self.engine_id,
            "agent_name": self.agent.name,
            "transfer_mode": self._mode,
            "transfer_mode_reason": self._mode_reason,
            "kv_layout": KV_LAYOUT,
            "staging": {"slots": self.staging.num_slots, "bytes": self.staging.nbytes} if self.staging else None,
        }
        self._role_info(info)
        resolved = self._resolved_mode() if self._mode == "auto" else None
        if resolved is not None:
            info["transfer_mode"], info["transfer_mode_reason"] = resolved
        return info

    def shutdown(self) -> None:
        """Each role stops its threads and servers first, then calls this."""
        self.agent.close()
