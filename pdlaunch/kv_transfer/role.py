"""The interface a KV connector delegates to: the prefill side (prefill/side.py) or the decode side
(decode/side.py) of one engine. Each side implements what its role does; the rest keeps these
defaults, so the connector never asks which role it serves."""

from __future__ import annotations

from typing import Any

from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnectorEvents
from pdlaunch.kv_transfer.messages import Notification
from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer
from pdlaunch.kv_transfer.staging import StagingArea


class RoleSide:
    role = ""

    def attach(self, spec: KVCacheSpec, staging: StagingArea | None, kv_epoch: int) -> None:
        """The KV cache was registered (again, after a wake-up): its spec, the staging buffer KV moves
        through (None: the KV cache itself), and the epoch peers must shake hands with."""

    def drop_staging(self) -> None:
        """The staging buffer is freed before sleep: stop using it."""

    def staging_users(self) -> set[str]:
        """Request ids that may hold staging slots now."""
        return set()

    def before_sleep(self, kv_epoch: int) -> None:
        """Ask peers that mapped this engine's memory (or whose memory it mapped) to drop it."""

    def num_new_matched_tokens(self, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
                               num_local_computed_tokens: int) -> int:
        return 0

    def start_load(self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
                   block_ids: list[list[int]], num_local_computed_tokens: int, num_external_tokens: int) -> None:
        """Decode: start loading the KV the params name."""

    def request_finished(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: KVTransferParams | None,
                         block_ids: list[list[int]]) -> tuple[bool, PrefillAnswer | None]:
        return False, None

    def on_notif(self, notif: Notification) -> None:
        """A notification of the transport; each side handles its kinds and ignores the others."""

    def poll(self, now: float, events: KVConnectorEvents) -> None:
        """Engine thread: fill `events` with what finished."""

    def release_held(self, request_id: str) -> bool:
        return False

    def abort_load(self, request_id: str) -> bool:
        return False

    @property
    def side_channel_port(self) -> int:
        return 0

    def info(self, info: dict[str, Any]) -> None:
        """Add this side's part of /info to `info`."""

    def shutdown(self) -> None:
        """Stop threads and servers."""
