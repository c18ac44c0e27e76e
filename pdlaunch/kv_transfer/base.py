"""The connector interface: the slots a KV connector (nixl, mooncake, storage) fills in the engine.

Scheduler side (called by the engine loop, one thread): which requests load KV, which keep their
blocks after finishing, and what finished. Worker side: register the KV memory, move blocks.
Both sides live in one object per engine process. A connector that serves one role implements only
that role's calls and keeps the defaults of the others (the NIXL connector is a class per role:
prefill/side.py, decode/side.py).

Flow on a PD pair (prompt of n tokens, block_size B):
  kv_transfer_params arrive as the models params.py defines (`KVTransferParams`): the engine parsed
  and checked them once, where the request entered it.
  prefill: request carries kv_transfer_params={"do_remote_decode": True}; it runs normally with
    max_tokens=1; when it finishes the engine calls `request_finished`, which returns
    (hold=True, params) -> the engine keeps the request's blocks, answers with `params`, and frees
    the blocks only when `get_finished().finished_sending` names the request (decode read them,
    or the lease expired).
  decode: request carries the params above (do_remote_prefill=True, remote_block_ids, ...). The
    engine matches its local prefix cache (k tokens, full blocks), asks
    `get_num_new_matched_tokens` how many more tokens the connector provides (n - 1 - k: the
    last prompt token is always recomputed to get logits), allocates blocks for all n tokens,
    calls `start_load` and parks the request until `get_finished().finished_recving` names it
    (or `failed_recving` does: the engine then finishes it with an error and frees its blocks).

Lifecycle contract (no block is written, read or held after the engine lets it go):
  - `request_finished` is called only for requests that finished normally (stop/length): their
    KV is complete, so a returned hold=True is always honoured. A request that is aborted or fails
    is never offered for a remote decode and the connector is not asked about it.
  - A decode request that ends before its load started gets `release_unloaded`: the prefill drops its hold.
  - A decode request aborted while its KV is loading gets `abort_load`. It returns True when a
    transfer may still write into the request's blocks (a push WRITE the prefill side posted, a
    READ that could not be cancelled): the engine then keeps the blocks out of the free list
    ("draining") until `get_finished().safe_to_free` names the request. A failed load does the
    same by naming the request in `draining` next to `failed_recving`. The connector bounds this:
    at most the transfer timeout plus a grace period after the load started, or, for a READ the
    transport cannot cancel (Mooncake), until that READ ended (its own transfer timeout bounds it).
  - Pull: decode claims a held request's blocks on the prefill side (side channel) as it posts its
    READ, and counts the READ only once the claim is answered; a claimed hold outlives its lease
    until decode's "read_done" / "release" notification or a hard cap (decode's transfer deadline
    plus a grace period), so the prefill blocks are never reused mid-read. A claim after the lease
    expired fails the request.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, get_args

import torch
from pydantic import JsonValue

from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer

ConnectorInfo = dict[str, JsonValue]  # what /info shows about a connector


@dataclass
class KVCacheSpec:
    """The engine's KV cache as a connector sees it (see model/attention_metadata.py for layout).

    kv_caches[g]: [num_blocks, num_layers_g, 2, block_size, num_kv_heads, head_dim], contiguous;
    block b of group g is bytes [data_ptr + b * block_bytes[g], + block_bytes[g]).
    """

    kv_caches: list[torch.Tensor]
    num_blocks: int
    block_size: int
    num_kv_heads: int  # per TP rank
    head_dim: int
    dtype: torch.dtype
    group_layers: list[list[int]]  # global layer indices of each group
    group_sliding_window: list[int | None]  # window (tokens) of each group, None = full attention
    model_name: str  # architecture + a hash of the config, for the compatibility check
    tp_size: int = 1
    tp_rank: int = 0
    kv_cache_dtype: torch.dtype | None = None  # the cache tensors' dtype (None: `dtype`); fp8 = float8_e4m3fn
    kv_scales: str = ""  # digest of every layer's (k_scale, v_scale) when the cache is fp8
    checkpoint_path: Path | None = None  # the weights' directory (storage connector: model/weights_digest.py)
    weights_version: int = 0  # loads of the weights from checkpoint_path after the first (a level-2 wake reloads them)

    @property
    def device(self) -> torch.device:
        return self.kv_caches[0].device

    @functools.cached_property
    def block_bytes(self) -> list[int]:
        """Bytes of one block per group, worked out once: every load reads it, several times (a tensor view a
        group each time was ~2% of a CPU pull's loader thread)."""
        return [t[0].numel() * t.element_size() for t in self.kv_caches]


LoadEnd = Literal["done", "failed", "aborted"]
LOAD_ENDS: Final = get_args(LoadEnd)
MAX_OUTCOME_BYTES = 1 << 50  # one rank's load of one request: a PiB is far past any KV cache
MAX_OUTCOME_SECONDS = 30 * 86400.0  # a load ends by its deadline (at most a day) plus a grace


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    """How one TP rank's KV load of a request ended, for the KV transfer series rank 0 observes for its group
    (distributed/tp_connector.py): "done" (its KV is in: `num_bytes` moved, `load_seconds` from start_load,
    `xfer_seconds` from its first transfer's post, None when it posted none), "failed", or "aborted" (nothing
    counted)."""

    end: LoadEnd
    num_bytes: int = 0
    load_seconds: float = 0.0
    xfer_seconds: float | None = None

    def problem(self) -> str | None:
        """Why the fields do not hold an outcome (a TP rank's, checked where rank 0 receives it), or None."""
        if self.end not in LOAD_ENDS:
            return f"end is {self.end!r}, not one of {', '.join(LOAD_ENDS)}"
        if not isinstance(self.num_bytes, int) or isinstance(self.num_bytes, bool) or \
                not 0 <= self.num_bytes <= MAX_OUTCOME_BYTES:
            return f"num_bytes is {self.num_bytes!r}, not an int in [0, {MAX_OUTCOME_BYTES}]"
        for name in ("load_seconds", "xfer_seconds"):
            value = getattr(self, name)
            if value is None and name == "xfer_seconds":
                continue
            if not isinstance(value, float | int) or isinstance(value, bool) or \
                    not 0.0 <= value <= MAX_OUTCOME_SECONDS:  # NaN fails both comparisons
                return f"{name} is {value!r}, not seconds in [0, {MAX_OUTCOME_SECONDS:g}]"
        return None


@dataclass
class KVConnectorEvents:
    finished_sending: set[str] = field(default_factory=set)  # prefill: held blocks may be freed now
    finished_recving: set[str] = field(default_factory=set)  # decode: KV is in the local blocks
    failed_recving: dict[str, str] = field(default_factory=dict)  # decode: request_id -> error message
    # decode: requests of failed_recving whose blocks a transfer may still write: keep them until safe_to_free
    draining: set[str] = field(default_factory=set)
    # decode: draining (failed or aborted) loads whose blocks no transfer can write any more
    safe_to_free: set[str] = field(default_factory=set)
    # decode, a rank of a TP group: how each of its loads ended since the last call, once per load; rank 0 observes
    # the group's KV transfer series from them (TPConnector). Empty where the connector observes its own (TP 1).
    load_outcomes: dict[str, LoadOutcome] = field(default_factory=dict)


class KVConnector(ABC):
    """One per engine. Request ids are the engine's own request ids."""

    # -- worker side --------------------------------------------------------------------------
    @abstractmethod
    def register_kv_caches(self, spec: KVCacheSpec) -> None:
        """Register the KV memory (once, after the engine allocated it)."""

    # -- scheduler side -----------------------------------------------------------------------
    def get_num_new_matched_tokens(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        kv_transfer_params: KVTransferParams | None,
        num_local_computed_tokens: int,
    ) -> int:
        """Prompt tokens beyond the local prefix hit that this connector will load (0: none)."""
        return 0

    def start_load(  # noqa: B027 - a connector that loads nothing (the prefill role) keeps this
        self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
        block_ids: list[list[int]], num_local_computed_tokens: int, num_external_tokens: int,
    ) -> None:
        """Start loading positions [num_local_computed_tokens, + num_external_tokens) into the
        request's per-group block tables `block_ids` (covering the whole prompt; in a sliding-window
        group, entries before the window of the last loaded position are -1: nothing reads them, so
        nothing is loaded there). Asynchronous: the outcome comes from `get_finished`. Called even
        when num_external_tokens == 0 and params ask for remote prefill, so the prefill side is told
        it may free its blocks. Called on the thread that launches the forwards, whose last ones may
        still write these blocks (freed under them): a write from another thread or stream waits for
        them (decode/compute_order.py)."""

    def request_finished(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: KVTransferParams | None,
                         block_ids: list[list[int]]) -> tuple[bool, PrefillAnswer | None]:
        """A request finished here. Returns (hold_blocks, the answer for the response: the engine signs it)."""
        return False, None

    @abstractmethod
    def get_finished(self) -> KVConnectorEvents:
        """Progress transfers, handle notifications and leases; report what completed."""

    def abort_load(self, request_id: str) -> bool | None:
        """The engine aborted a request that was waiting for KV; stop caring about it.

        True: a transfer may still write into its blocks; the engine keeps them until
        `get_finished().safe_to_free` names the request. False/None: free them now."""
        return False

    def release_unloaded(  # noqa: B027 - a connector that loads nothing (the prefill role) keeps this
        self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
    ) -> None:
        """Decode: a request whose params ask for a remote prefill's KV ended before `start_load` was called for it
        (aborted or failed while queued, ended by the prefill's first token at admission, refused by the engine):
        tell the prefill to drop its hold now, not at its lease's end. No load ran, so `abort_load` finds none to
        end. Best effort, and it must not block the engine thread (a prefill not told frees at its lease's end)."""

    def release_held(self, request_id: str) -> bool:
        """Prefill: the decode leg of `request_id` will not run (the client went away, the decode
        refused the request): free its held blocks now instead of at the lease's end. The blocks
        are reported in a later `get_finished().finished_sending` (at once, or when a push or
        staging copy that is reading them ends). Returns False when the request is not held here,
        or a decode READ has claimed it (that claim's own cap bounds it)."""
        return False

    def forget_engine(self, engine_id: str) -> int:
        """Another engine of the deployment died (its launcher restarts it with a new engine_id): drop what this
        connector keeps of it, above all the transport's metadata of its agents, whose mapping of its memory
        would keep that memory allocated on its GPU. Returns how many agents were dropped (0: none known). A
        transfer with that engine in flight fails as it would anyway; transfers with other engines go on."""
        return 0

    def before_sleep(self) -> None:  # noqa: B027 - an optional hook: most connectors hold no device memory
        """The engine is idle and about to release its device memory (sleep mode): drop the device
        memory this connector holds itself (e.g. a staging buffer). `register_kv_caches`, called
        again after the wake-up, creates it anew. Raising refuses the sleep before anything is freed."""

    def weights_reloaded(self, spec: KVCacheSpec) -> None:  # noqa: B027 - only the storage connector keys by weights
        """A level-2 wake-up reloaded the weights from the checkpoint (`spec.weights_version` grew) after the KV
        cache was woken and registered in an earlier call: the KV memory is the same, the weights may be new. A
        connector that keys what it keeps by the weights (the storage connector) takes the new ones' key."""

    def info(self) -> ConnectorInfo:
        """What /info shows about the connector (transfer mode and why, agent names...)."""
        return {}

    def shutdown(self) -> None:  # noqa: B027 - an optional hook: a connector may own nothing to release
        """Release agents, threads and sockets."""
