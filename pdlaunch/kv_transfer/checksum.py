"""End-to-end KV checksums (`kv_transfer.verify_kv`).

One digest per block (blake2b, 8 bytes, hex) over the block's raw bytes, all layers of the group.
Per block rather than per request because decode may move only part of the prompt (its own prefix
cache hit skips leading blocks): it recomputes the digests of exactly the blocks it received and
compares them with the prefill side's digests at the same block-table indices.
"""

from __future__ import annotations

import hashlib

import torch

from pdlaunch.errors import KVTransferError


def block_checksums(kv_cache: torch.Tensor, block_ids: list[int]) -> list[str]:
    """Digest of each block of `kv_cache` ([num_blocks, ...]); "" for -1 (not held)."""
    held = [b for b in block_ids if b >= 0]
    if not held:
        return ["" for _ in block_ids]
    # One gather + one device->host copy for all blocks, then hash each block's bytes on the host.
    data = kv_cache[torch.tensor(held, device=kv_cache.device)].contiguous().view(torch.uint8)
    host = data.reshape(len(held), -1).cpu().numpy()
    digests = {b: hashlib.blake2b(host[i].tobytes(), digest_size=8).hexdigest() for i, b in enumerate(held)}
    return [digests.get(b, "") for b in block_ids]


def verify_blocks(
    kv_cache: torch.Tensor,
    group: int,
    local_ids: list[int],
    expected: list[str],
    request_id: str,
) -> None:
    """Raise KVTransferError naming the first block whose received bytes differ from the sender's."""
    got = block_checksums(kv_cache, local_ids)
    for i, (want, have) in enumerate(zip(expected, got)):
        if want != have:
            raise KVTransferError(
                f"KV checksum mismatch for request {request_id}: group {group}, local block {local_ids[i]} "
                f"received {have}, the prefill side computed {want}",
                field="kv_transfer.verify_kv",
                hint="the KV cache was corrupted in transit or freed on the prefill side before it was read "
                "(lease shorter than the decode queueing time?); the request failed instead of producing garbage",
            )
