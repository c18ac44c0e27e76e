"""NixlConnector: KV moves between a prefill and a decode engine through NIXL (UCX), pull or push.

One NIXL agent per engine process (per TP rank); the KV cache tensors are registered once, one region
per group. The prefill instance serves the handshake side channel on
instance.side_channel_port (+ tp_rank); decode connects to it with the params prefill returned.
See nixl_sender.py (prefill: holds, leases, push) and nixl_receiver.py (decode: handshake, loads).
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
from pdlaunch.kv_transfer import side_channel
from pdlaunch.kv_transfer.agent import KVAgent, decode_notif
from pdlaunch.kv_transfer.auth import RateLimitedWarning, SideChannelKeys, require_secret
from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnector, KVConnectorEvents
from pdlaunch.kv_transfer.blocks import needed_block_indices, pair_blocks
from pdlaunch.kv_transfer.checksum import block_checksums
from pdlaunch.kv_transfer.handshake import (
    KV_LAYOUT,
    DeviceInfo,
    HandshakeInfo,
    compat_fields,
    compat_hash,
    device_info,
)
from pdlaunch.kv_transfer.nixl_receiver import DecodeSide
from pdlaunch.kv_transfer.nixl_sender import PrefillSide
from pdlaunch.kv_transfer.params import first_token_ids
from pdlaunch.kv_transfer.push_params import prompt_digest
from pdlaunch.kv_transfer.reshard import ReshardPlan, plan_reshard
from pdlaunch.kv_transfer.side_channel import SideChannelServer
from pdlaunch.kv_transfer.staging import DEFAULT_STAGING_BYTES, StagingArea
from pdlaunch.memory import platform

logger = logging.getLogger(__name__)

_REQUIRED_PARAMS = ("remote_engine_id", "remote_block_ids", "remote_host", "remote_port", "remote_request_id")
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

    def __init__(self, config: DeploymentConfig, instance: InstanceSpec, staging_bytes: int | None = None) -> None:
        if instance.role not in ("prefill", "decode"):
            raise KVTransferError(f"a NIXL connector serves prefill or decode instances, not {instance.role!r}",
                                  field="role")
        self.config = config
        self.kv = config.kv_transfer
        self.instance = instance
        self.role = instance.role
        self.engine_id = instance.engine_id
        self.keys = SideChannelKeys.from_secret(require_secret(config.security.deployment_secret,
                                                               "the NIXL KV connector's side channel"))
        self._bad_notif = RateLimitedWarning(logger)
        # Seed 000: capture the device before the transfer engine exists (it may change the current
        # device while initialising) and bind it; sender threads bind this index in their initializer.
        self.device_index = platform.current_device_index()
        platform.set_device(self.device_index)
        if config.model.enable_sleep_mode:
            # A mapped buffer stays allocated after its owner frees it, so a sleeping peer's staging
            # buffer must be unmapped here: before_sleep drops the peers' keys, and with UCX's mapping
            # cache on, mappings can outlive the keys (UCX issue 11753).
            os.environ.setdefault("UCX_CUDA_IPC_CACHE", "n")
        bind_ucx_to_loopback(self.kv.side_channel_host)
        self.agent = KVAgent(f"pdlaunch-{self.role}-{self.engine_id[:12]}-{uuid.uuid4().hex[:8]}")
        self.spec: KVCacheSpec | None = None
        self.kv_epoch = 0  # grows each time the KV memory is registered again (after a wake-up)
        self.staging_bytes = staging_bytes
        self.staging: StagingArea | None = None
        self._slept_staging_bytes = 0  # budget of the staging buffer before_sleep dropped (0: none)
        self.server: SideChannelServer | None = None
        self._local_device: DeviceInfo | None = None
        self._handshake: HandshakeInfo | None = None
        self.sender: PrefillSide | None = None
        self.receiver: DecodeSide | None = None
        if self.role == "prefill":
            self.sender = PrefillSide(self.agent, self.kv.kv_lease_seconds, self.kv.transfer_timeout_seconds,
                                      self.device_index)
        else:
            self.receiver = DecodeSide(
                self.agent, self._require_spec, self._device, self.kv.transfer_mode,
                self.kv.handshake_timeout_seconds, self.kv.transfer_timeout_seconds, self.kv.verify_kv,
                self.keys, self.device_index,
            )
        self._mode, self._mode_reason = self._initial_mode()
        logger.info("NIXL connector (%s, engine %s): transfer mode %s: %s", self.role, self.engine_id,
                    self._mode, self._mode_reason)

    def _initial_mode(self) -> tuple[str, str]:
        if self.role == "prefill":
            return self.kv.transfer_mode, "prefill serves both: decode READs (pull) or asks for a WRITE (push)"
        if self.kv.transfer_mode != "auto":
            return self.kv.transfer_mode, f"kv_transfer.transfer_mode is {self.kv.transfer_mode}"
        if self.instance.device == "cpu":
            return "pull", "CPU DRAM on both sides: UCX reads between processes, so decode pulls"
        return "auto", "decided per prefill engine at the first handshake (push unless NVLink joins the GPUs)"

    def _answer_mode(self) -> str:
        """The transfer mode a prefill's answer names (vLLM's field; never "auto"): the configured one,
        else what a decode of this deployment resolves: NIXL pulls between CPU processes and pushes
        between GPUs (a decode joined to this GPU by NVLink may still pull: it decides per prefill
        engine); Mooncake pushes."""
        if self.kv.transfer_mode != "auto":
            return self.kv.transfer_mode
        if self.kv.connector == "mooncake":  # auto pushes (pulls only to reshard between TP sizes)
            return "push"
        return "pull" if self.instance.device == "cpu" else "push"

    # -- worker side --------------------------------------------------------------------------
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
        if self.receiver is not None:
            self.receiver.staging = self.staging
        if self.sender is not None:
            self.sender.spec = spec
            self.sender.staging = self.staging
            self._handshake = self._handshake_info(spec)
            base = self.instance.side_channel_port or self.kv.side_channel_port or 0
            port = base + spec.tp_rank if base else 0
            self.server = SideChannelServer(
                self.kv.side_channel_host, port,
                {"handshake": self._on_handshake, "push": self.sender.handle_push,
                 "stage": self.sender.handle_stage, "unstage": self.sender.handle_unstage,
                 "claim_read": self.sender.handle_claim_read, "cancel_push": self.sender.handle_cancel_push,
                 "forget": self.sender.handle_forget, "listen": self.sender.handle_listen,
                 "held_blocks": self._on_held_blocks},
                self.keys,
            )
            logger.info("KV side channel of prefill engine %s (tp rank %d) on %s:%d", self.engine_id,
                        spec.tp_rank, self.kv.side_channel_host, self.server.port)

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
            if self.receiver is not None:
                self.receiver.staging = self.staging
            if self.sender is not None:
                self.sender.staging = self.staging
        elif self.staging is None:
            self.agent.reregister(spec.kv_caches)
            self.kv_epoch += 1
        self.spec = spec
        if self.sender is not None:
            self.sender.spec = spec
            self._handshake = self._handshake_info(spec)
        logger.info("KV cache registered again after a wake-up (epoch %d)", self.kv_epoch)

    def before_sleep(self) -> None:
        """Deregister and free the staging buffer (1 GiB by default on CUDA); `_reregister` makes a new
        one after the wake-up. Refused while a transfer holds staging slots: freeing them would pull
        memory from under a NIXL READ/WRITE or a copy.

        A decode also drops the NIXL metadata of every prefill engine, and asks the prefill engines
        that pushed to it to drop its own: UCX maps a peer's registered GPU memory when it loads the
        peer's keys and unmaps it when they go, and until then the mapping keeps the memory allocated
        (1 GiB staging buffers; on one H100 a sleeping decode kept 1.1 GiB this way). A prefill has
        no side channel to its decodes: it sends a NIXL notification to the decodes it pushed to and
        to those that READ from it (they gave it their connection info at the handshake), which
        their engine loops handle within a step (~10 ms when idle)."""
        staging = self.staging
        in_use = staging.num_slots - staging.num_free() if staging is not None else 0
        if staging is not None and in_use:
            users: set[str] = set()
            for side in (self.sender, self.receiver):
                if side is not None:
                    users |= side.staging_users()
            raise KVTransferError(
                f"{in_use} of {staging.num_slots} KV staging slots are in use by "
                + (f"request(s) {', '.join(sorted(users))}" if users else "a transfer that is ending"),
                field="sleep",
                hint="sleep once the KV transfers have ended (at most kv_transfer.transfer_timeout_seconds)",
            )
        self._tell_pushers_to_forget()
        if self.receiver is not None:
            self.receiver.peers.forget_all()
        if self.sender is not None:
            self.sender.tell_decodes_to_forget(self.kv_epoch)
        if staging is None:
            return
        self.agent.deregister()
        if self.sender is not None:
            self.sender.staging = None
        if self.receiver is not None:
            self.receiver.staging = None
        self.staging = None
        spec = self._require_spec()
        self._slept_staging_bytes = self._staging_budget(spec)
        nbytes = staging.nbytes
        del staging
        if spec.device.type == "cuda":
            torch.cuda.empty_cache()  # the buffer came from the caching allocator, outside the CuMem pools
        logger.info("KV staging buffer deregistered and freed before sleep (%.0f MiB)", nbytes / 2**20)

    def _tell_pushers_to_forget(self) -> None:
        """Prefill engines that pushed into this decode hold UCX mappings of its staging buffer, which
        keep the buffer allocated after we free it; ask each to drop our metadata first (also one
        that went to sleep before us and so left our peer cache). An engine that does not answer is
        logged and skipped (its mapping then lives until it exits)."""
        if self.receiver is None:
            return
        for (host, port), engine_id in self.receiver.peers.take_pushers().items():
            try:
                side_channel.call(host, port, {"type": "forget", "agent_name": self.agent.name},
                                  self.kv.handshake_timeout_seconds, f"asking prefill engine {engine_id} "
                                  "to forget this decode before sleep", self.keys)
            except KVTransferError as exc:
                logger.warning("%s; its mapping of the staging buffer stays until it exits", exc)

    def _require_spec(self) -> KVCacheSpec:
        if self.spec is None:
            raise KVTransferError("the KV cache is not registered yet",
                                  hint="the engine calls register_kv_caches first")
        return self.spec

    def _device(self) -> DeviceInfo:
        if self._local_device is None:
            self._local_device = device_info(self._require_spec().device)
        return self._local_device

    def _handshake_info(self, spec: KVCacheSpec) -> HandshakeInfo:
        fields = compat_fields(spec)
        registered = self.staging.buffers if self.staging is not None else spec.kv_caches
        return HandshakeInfo(
            engine_id=self.engine_id, agent_name=self.agent.name, agent_metadata=self.agent.metadata().hex(),
            base_addrs=[t.data_ptr() for t in registered], block_bytes=spec.block_bytes,
            num_blocks=spec.num_blocks, block_size=spec.block_size, dtype=str(fields["dtype"]), kv_layout=KV_LAYOUT,
            num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, group_layers=spec.group_layers,
            model_name=spec.model_name, tp_size=spec.tp_size, tp_rank=spec.tp_rank, device=self._device(),
            compat_hash=compat_hash(fields), staging_slots=self.staging.num_slots if self.staging else 0,
        )

    def _on_held_blocks(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.sender is not None
        return {**self.sender.handle_held_blocks(message), "kv_epoch": self.kv_epoch}

    def _on_handshake(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self._handshake is not None
        return {"info": self._handshake.model_dump()}

    @property
    def side_channel_address(self) -> tuple[str, int]:
        host = self.kv.side_channel_host
        if host in ("", "0.0.0.0", "::"):
            host = self.instance.host
        return host, self.server.port if self.server is not None else 0

    # -- scheduler side -----------------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: dict[str, Any] | None,
        num_local_computed_tokens: int,
    ) -> int:
        if self.receiver is None or not kv_transfer_params or not kv_transfer_params.get("do_remote_prefill"):
            return 0
        # The last prompt token is recomputed locally for the first token's logits, unless the prefill
        # handed that token over (engine/first_token.py): then every prompt position is loaded.
        recompute = 0 if first_token_ids(kv_transfer_params) else 1
        return max(0, len(prompt_token_ids) - recompute - num_local_computed_tokens)

    def start_load(
        self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: dict[str, Any] | None,
        block_ids: list[list[int]], num_local_computed_tokens: int, num_external_tokens: int,
    ) -> None:
        params = kv_transfer_params or {}
        if self.receiver is None or not params.get("do_remote_prefill"):
            return
        try:
            if params.get("remote_block_ids") is None and "signature" not in params:
                # vLLM's push proxy: the block ids come from the prefill itself (push_params.py).
                self._check_unsigned_push(params)
                self.receiver.start_unplanned(request_id, params, prompt_digest(prompt_token_ids), lambda p: self._plan(
                    prompt_token_ids, p, block_ids, num_local_computed_tokens, num_external_tokens))
                return
            pairs = self._plan(prompt_token_ids, params, block_ids, num_local_computed_tokens, num_external_tokens)
            reshard = self._reshard_plan(params)
        except KVTransferError as e:
            self.receiver.fail_now(request_id, params, e.render())
            return
        self.receiver.start(request_id, params, pairs, reshard)

    def _check_unsigned_push(self, params: dict[str, Any]) -> None:
        spec = self._require_spec()
        if int(params.get("tp_size") or 1) != spec.tp_size or spec.tp_size != 1:
            raise KVTransferError(
                f"params without remote_block_ids need prefill and decode at TP size 1 (prefill "
                f"{params.get('tp_size')}, decode {spec.tp_size})",
                hint="send the prefill's kv_transfer_params unchanged (as vLLM's pull proxy does)")

    def _reshard_plan(self, params: dict[str, Any]) -> ReshardPlan | None:
        """None when prefill has this engine's TP size (rank r reads rank r), else this rank's sources."""
        spec = self._require_spec()
        if int(params.get("tp_size", 1)) == spec.tp_size:
            return None
        return plan_reshard(params, spec.tp_rank, spec.tp_size, spec.num_kv_heads)

    def _plan(
        self, prompt: list[int], params: dict[str, Any], block_ids: list[list[int]], start: int, count: int,
    ) -> list[list[tuple[int, int, int]]]:
        spec = self._require_spec()
        missing = [k for k in _REQUIRED_PARAMS if k not in params]
        if missing:
            raise KVTransferError(f"kv_transfer_params lack {', '.join(missing)}",
                                  hint="send decode the kv_transfer_params the prefill response carried")
        expected = params.get("num_prompt_tokens")
        if expected is not None and int(expected) != len(prompt):
            raise KVTransferError(
                f"the prompt has {len(prompt)} tokens here but {expected} on prefill engine "
                f"{params['remote_engine_id']}",
                hint="send the same prompt (token ids) to prefill and decode",
            )
        remote_ids = params["remote_block_ids"]
        if len(remote_ids) != len(block_ids):
            raise KVTransferError(f"prefill sent block ids of {len(remote_ids)} KV-cache groups, this engine has "
                                  f"{len(block_ids)}", hint="serve the same model on prefill and decode")
        return [
            pair_blocks(block_ids[g], remote_ids[g],
                        needed_block_indices(spec.block_size, start, count, spec.group_sliding_window[g]), g)
            for g in range(len(block_ids))
        ]

    def request_finished(
        self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: dict[str, Any] | None,
        block_ids: list[list[int]],
    ) -> tuple[bool, dict[str, Any] | None]:
        if self.sender is None or not kv_transfer_params or not kv_transfer_params.get("do_remote_decode"):
            return False, None
        spec = self._require_spec()
        host, port = self.side_channel_address
        params: dict[str, Any] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_block_ids": [list(b) for b in block_ids],
            "remote_host": host,
            "remote_port": port,
            "remote_request_id": request_id,
            "tp_size": spec.tp_size,
            "kv_heads_per_rank": spec.num_kv_heads,
            "transfer_mode": self._answer_mode(),
            "num_prompt_tokens": len(prompt_token_ids),
            "remote_num_tokens": len(prompt_token_ids),
            "remote_blocks_expiry_time": time.time() + self.kv.kv_lease_seconds,  # unix seconds, as vLLM
            "kv_epoch": self.kv_epoch,
        }
        if self.kv.verify_kv:
            params["kv_checksum"] = [block_checksums(spec.kv_caches[g], b) for g, b in enumerate(block_ids)]
        self.sender.hold(request_id, block_ids, prompt_digest(prompt_token_ids))
        return True, params

    def get_finished(self) -> KVConnectorEvents:
        events = KVConnectorEvents()
        if self.spec is None:
            return events
        for message in self.agent.new_notifs():
            notif = decode_notif(message)
            if notif is None:
                self._bad_notif.warn("notif", "ignoring a malformed NIXL notification: %r", message[:200])
            elif notif["kind"] in ("read_done", "release") and self.sender is not None:
                self.sender.on_notif(notif)
            elif notif["kind"] in ("push_done", "push_failed") and self.receiver is not None:
                self.receiver.on_notif(notif)
            elif notif["kind"] == "forget" and self.receiver is not None:
                self.receiver.peers.forget_agent(notif["agent_name"], notif["kv_epoch"])
        now = time.monotonic()
        if self.sender is not None:
            events.finished_sending = self.sender.poll(now)
        if self.receiver is not None:
            events.finished_recving, events.failed_recving = self.receiver.poll(now)
            events.draining, events.safe_to_free = self.receiver.poll_draining(now)
        return events

    def release_held(self, request_id: str) -> bool:
        return self.sender.release(request_id) if self.sender is not None else False

    def abort_load(self, request_id: str) -> bool:
        return self.receiver.abort(request_id) if self.receiver is not None else False

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "connector": "nixl",
            "role": self.role,
            "engine_id": self.engine_id,
            "agent_name": self.agent.name,
            "transfer_mode": self._mode,
            "transfer_mode_reason": self._mode_reason,
            "kv_layout": KV_LAYOUT,
            "staging": {"slots": self.staging.num_slots, "bytes": self.staging.nbytes} if self.staging else None,
        }
        if self.server is not None:
            host, port = self.side_channel_address
            info["side_channel"] = f"{host}:{port}"
            info["held_requests"] = self.sender.num_held() if self.sender else 0
        if self.receiver is not None:
            info["loading_requests"] = self.receiver.num_loading()
            info["peers"] = {eid: {"transfer_mode": r.mode, "reason": r.reason}
                             for eid, r in self.receiver.peers.snapshot().items()}
            if self._mode == "auto" and info["peers"]:
                first = next(iter(info["peers"].values()))
                info["transfer_mode"], info["transfer_mode_reason"] = first["transfer_mode"], first["reason"]
        return info

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.sender is not None:
            self.sender.shutdown()
        if self.receiver is not None:
            self.receiver.shutdown()
        self.agent.close()
