"""StorageConnector: KV blocks through safetensors files (vLLM #42926); also a prefix store across restarts.

Layout under `kv_transfer.storage_path`:

    <root>/<compat_key>/<key[:2]>/<key>.safetensors    one file per block-aligned prompt chunk

compat_key hashes what makes blocks interchangeable (model, dtype, block size, heads, layout, TP
rank, a digest of the weights (model/weights_digest.py) and --quantization), so an incompatible engine
never finds the files: neither another model, nor a fine-tune of the same architecture or the same
checkpoint quantized at load, whose deployment shares the directory (the default one is per user).
Chunk i of a prompt holds positions [i*B, i*B + len) and its key chains the token ids: key_0 = "",
key_{i+1} = H(key_i, "full", tokens of block i); a tail shorter than a block is stored as
H(key_i, "tail", tail tokens). A key names the whole prefix up to the chunk's end, so any later prompt
that shares that prefix finds the file.
Each file has one tensor per KV-cache group that held the block ("group_<g>": [num_layers, 2, len,
num_kv_heads, head_dim]); sliding-window groups may lack early chunks, which they never read.

Prefill saves when a request with do_remote_decode finishes (synchronously: no blocks are held).
Decode looks up every request's prompt, loads what it finds onto the KV cache tensor's own device
(`device=str(kv_cache.device)`, never a hard-coded one) and reports it at the next get_finished.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.base import ConnectorInfo, KVCacheSpec, KVConnector, KVConnectorEvents
from pdlaunch.kv_transfer.blocks import needed_block_indices
from pdlaunch.kv_transfer.fault import TransferFaults
from pdlaunch.kv_transfer.handshake import compat_fields, compat_hash
from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer, wants_remote_decode, wants_remote_prefill
from pdlaunch.metrics.kv_transfer import KV_TRANSFER_BYTES, KV_TRANSFER_FAILURES
from pdlaunch.model.weights_digest import weights_digest

logger = logging.getLogger(__name__)


def _chain(key: str, kind: str, tokens: list[int]) -> str:
    data = f"{key}|{kind}|{','.join(map(str, tokens))}".encode()
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass
class Chunk:
    path: Path
    num_tokens: int  # positions [index * block_size, + num_tokens)
    groups: set[int]


class StorageConnector(KVConnector):
    def __init__(self, config: DeploymentConfig, instance: InstanceSpec) -> None:
        self.kv = config.kv_transfer
        self.role = instance.role
        self.engine_id = instance.engine_id
        self.base = Path(self.kv.storage_path).expanduser()
        self.quantization = config.model.quantization
        self.root: Path | None = None
        self.spec: KVCacheSpec | None = None
        self._plans: dict[str, tuple[int, list[Chunk | None]]] = {}
        self._finished: set[str] = set()
        self._failed: dict[str, str] = {}
        self.faults = TransferFaults()  # test only (PDLAUNCH_TEST_FAIL_TRANSFER_RATE)
        # (checkpoint, weights_version) -> the digest of the weights that load gave the model
        self._weights: tuple[Path, int, str] | None = None

    def register_kv_caches(self, spec: KVCacheSpec) -> None:
        weights = self._weights_digest(spec)
        # --quantization fp8 computes with other weights than the same checkpoint unquantized
        fields = {**compat_fields(spec), "tp_rank": spec.tp_rank, "weights": weights,
                  "quantization": self.quantization}
        self.root = self.base / compat_hash(fields)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KVTransferError(f"cannot create the KV storage directory {self.root}: {e.strerror or e}",
                                  field="kv_transfer.storage_path", hint="point it at a writable directory") from e
        self.spec = spec

    def weights_reloaded(self, spec: KVCacheSpec) -> None:
        self.register_kv_caches(spec)  # the store of the weights reloaded (a KV cache woken first kept the old key)

    def _weights_digest(self, spec: KVCacheSpec) -> str:
        """The digest of the weights the model holds, read from its files when they were loaded (at the first
        registration, and again after a level-2 wake-up reloaded them: the files may hold new weights by then); a
        level-1 wake-up keeps the weights it backed up, so their digest stays too, whatever the files hold now."""
        if spec.checkpoint_path is None:
            return ""
        loaded = (spec.checkpoint_path, spec.weights_version)
        if self._weights is None or self._weights[:2] != loaded:
            self._weights = (*loaded, weights_digest(spec.checkpoint_path))
        return self._weights[2]

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.safetensors"

    # -- prefill: save --------------------------------------------------------------------------
    def request_finished(
        self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
        block_ids: list[list[int]],
    ) -> tuple[bool, PrefillAnswer | None]:
        self._plans.pop(request_id, None)
        if self.role != "prefill" or not wants_remote_decode(kv_transfer_params):
            return False, None
        assert self.spec is not None
        saved = self._save(prompt_token_ids, block_ids)
        params = PrefillAnswer(
            do_remote_prefill=True, do_remote_decode=False, remote_engine_id=self.engine_id,
            remote_request_id=request_id, num_prompt_tokens=len(prompt_token_ids),
            transfer_mode="storage", tp_size=self.spec.tp_size,
        )
        logger.debug("request %s: %d KV chunks written under %s", request_id, saved, self.root)
        return False, params

    def _save(self, prompt: list[int], block_ids: list[list[int]]) -> int:
        assert self.spec is not None
        bs, n = self.spec.block_size, len(prompt)
        key, written = "", 0
        for i in range(-(-n // bs)):
            tokens = prompt[i * bs:(i + 1) * bs]
            full = len(tokens) == bs
            chunk_key = _chain(key, "full" if full else "tail", tokens)
            path = self._path(chunk_key)
            groups = {g: ids[i] for g, ids in enumerate(block_ids) if i < len(ids) and ids[i] >= 0}
            if groups and not path.exists():
                # [num_layers, 2, len, heads, head_dim] of each group, on the host for the file.
                tensors = {f"group_{g}": self.spec.kv_caches[g][b, :, :, :len(tokens)].contiguous().cpu()
                           for g, b in groups.items()}
                self._write(path, tensors, len(tokens))
                written += 1
            key = chunk_key
        return written

    @staticmethod
    def _write(path: Path, tensors: dict[str, torch.Tensor], num_tokens: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"num_tokens": str(num_tokens)})
            os.replace(tmp, path)  # readers never see a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- decode: look up and load ---------------------------------------------------------------
    def _lookup(self, prompt: list[int]) -> list[Chunk | None]:
        """Stored chunks of the blocks holding positions [0, n - 1), None where nothing is stored."""
        assert self.spec is not None
        bs, n = self.spec.block_size, len(prompt)
        chunks: list[Chunk | None] = []
        key, probe_tails = "", True
        for i in range(-(-(n - 1) // bs)):
            full_key = _chain(key, "full", prompt[i * bs:(i + 1) * bs]) if (i + 1) * bs <= n else None
            chunk = self._open([(full_key, bs)]) if full_key else None
            if chunk is None and probe_tails:
                # The longest shorter tail stored for this block (a prompt that ended inside it); only
                # the first block without a full chunk can end the covered range, so probe only there.
                probe_tails = False
                chunk = self._open([(_chain(key, "tail", prompt[i * bs:i * bs + length]), length)
                                    for length in range(min(bs - 1, n - i * bs), 0, -1)])
            chunks.append(chunk)
            if full_key is None:
                break
            key = full_key
        return chunks

    def _open(self, candidates: list[tuple[str, int]]) -> Chunk | None:
        for key, length in candidates:
            path = self._path(key)
            if not path.exists():
                continue
            try:
                with safe_open(path, framework="pt") as f:
                    groups = {int(name.removeprefix("group_")) for name in f.keys()}
            except (SafetensorError, OSError, ValueError) as e:  # unreadable: as if not stored
                logger.warning("ignoring unreadable KV chunk %s: %s", path, e)
                continue
            return Chunk(path, length, groups)
        return None

    def _covers(self, chunks: list[Chunk | None], start: int, end: int) -> bool:
        assert self.spec is not None
        bs = self.spec.block_size
        for g, window in enumerate(self.spec.group_sliding_window):
            for b in needed_block_indices(bs, start, end - start, window):
                chunk = chunks[b] if b < len(chunks) else None
                if chunk is None or g not in chunk.groups or b * bs + chunk.num_tokens < min(end, (b + 1) * bs):
                    return False
        return True

    def get_num_new_matched_tokens(
        self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
        num_local_computed_tokens: int,
    ) -> int:
        if self.role != "decode" or self.spec is None or len(prompt_token_ids) <= 1:
            return 0
        k, bs = num_local_computed_tokens, self.spec.block_size
        chunks = self._lookup(prompt_token_ids)
        ends = sorted({min(len(prompt_token_ids) - 1, i * bs + c.num_tokens)
                       for i, c in enumerate(chunks) if c is not None}, reverse=True)
        end = next((e for e in ends if e > k and self._covers(chunks, k, e)), k)
        if wants_remote_prefill(kv_transfer_params) and end < len(prompt_token_ids) - 1:
            logger.warning("request %s: storage holds KV for %d of %d prompt tokens; the rest is computed here",
                           request_id, end, len(prompt_token_ids))
        if end <= k:
            return 0
        self._plans[request_id] = (end, chunks)
        return end - k

    def start_load(
        self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
        block_ids: list[list[int]], num_local_computed_tokens: int, num_external_tokens: int,
    ) -> None:
        plan = self._plans.pop(request_id, None)
        if num_external_tokens <= 0:
            return
        try:
            if plan is None or plan[0] < num_local_computed_tokens + num_external_tokens:
                raise KVTransferError(f"request {request_id}: no storage lookup covers the load",
                                      hint="the engine calls get_num_new_matched_tokens before start_load")
            self.faults.maybe_fail(request_id)
            moved = self._load(plan[1], block_ids, num_local_computed_tokens,
                               num_local_computed_tokens + num_external_tokens)
            KV_TRANSFER_BYTES.inc(moved)
            self._finished.add(request_id)
        except (KVTransferError, SafetensorError, OSError, KeyError, RuntimeError) as e:
            KV_TRANSFER_FAILURES.inc()
            text = e.render() if isinstance(e, KVTransferError) else f"loading stored KV failed: {e}"
            logger.error("request %s: %s", request_id, text)
            self._failed[request_id] = text

    def _load(self, chunks: list[Chunk | None], block_ids: list[list[int]], start: int, end: int) -> int:
        assert self.spec is not None
        bs, moved = self.spec.block_size, 0
        for g, window in enumerate(self.spec.group_sliding_window):
            cache = self.spec.kv_caches[g]
            for b in needed_block_indices(bs, start, end - start, window):
                chunk, block = chunks[b], block_ids[g][b]
                if chunk is None or block < 0:
                    raise KVTransferError(f"block {b} of group {g} is not loadable (stored: {chunk is not None})")
                lo, hi = max(start, b * bs) - b * bs, min(end, (b + 1) * bs) - b * bs
                # Seed 001: load straight onto the KV cache's device.
                with safe_open(chunk.path, framework="pt", device=str(cache.device)) as f:
                    data = f.get_tensor(f"group_{g}")  # [num_layers, 2, len, heads, head_dim]
                cache[block, :, :, lo:hi] = data[:, :, lo:hi]
                moved += data[:, :, lo:hi].numel() * data.element_size()
        return moved

    def get_finished(self) -> KVConnectorEvents:
        events = KVConnectorEvents(finished_recving=self._finished, failed_recving=self._failed)
        self._finished, self._failed = set(), {}
        return events

    def abort_load(self, request_id: str) -> None:
        self._plans.pop(request_id, None)
        self._finished.discard(request_id)
        self._failed.pop(request_id, None)

    def release_held(self, request_id: str) -> bool:
        """Nothing to release: a prefill saves its KV to files when the request finishes and holds
        no blocks for the decode leg."""
        return False

    def info(self) -> ConnectorInfo:
        return {"connector": "storage", "role": self.role, "engine_id": self.engine_id,
                "transfer_mode": "storage", "transfer_mode_reason": "kv_transfer.connector is storage",
                "storage_path": str(self.root or self.base)}
