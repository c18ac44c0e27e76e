"""Checks of what a prefill answered against its handshake, before a transfer strides by it: block ids
within its KV cache, staging slots within its staging buffer; and its block digests (kv_checksum) against
the blocks the load moves, before a load starts whose verification would index past them.
"""

from __future__ import annotations

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.decode.load import Load
from pdlaunch.kv_transfer.decode.peers import RemoteEngine
from pdlaunch.kv_transfer.remote_kv import RemoteKV

_SAME_VERSION = "run the same pdlaunch version on prefill and decode"


def check_block_ids(load: Load, remote: RemoteEngine, where: str) -> None:
    """The prefill block ids the load names lie in the prefill's KV cache (its handshake's num_blocks): a
    READ strides base_addrs by them, and one past the cache would read memory outside it."""
    top = max((p[2] for group in load.pairs for p in group), default=-1)
    if top >= remote.info.num_blocks:
        raise KVTransferError(f"request {load.request_id}: the prefill's block ids name block {top} of {where}, "
                              f"whose handshake announced {remote.info.num_blocks} blocks", hint=_SAME_VERSION)


def check_digests(load: Load, checksums: list[list[str]] | None, where: str) -> None:
    """The prefill's block digests name one digest per block-table index the load moves, in each of its KV-cache
    groups: the verification after the transfer indexes them by that index, and runs on the engine thread (an
    IndexError there would fail every request of the step, not only this one)."""
    if checksums is None:
        return
    moved = [g for g, pairs in enumerate(load.pairs) if pairs]
    if moved and moved[-1] >= len(checksums):
        raise KVTransferError(f"request {load.request_id}: {where} sent digests of {len(checksums)} KV-cache groups, "
                              f"the load moves blocks of {len(load.pairs)}", hint=_SAME_VERSION)
    for g in moved:
        top = max(p[0] for p in load.pairs[g])
        if top >= len(checksums[g]):
            raise KVTransferError(f"request {load.request_id}: {where} sent {len(checksums[g])} block digests for "
                                  f"group {g}, the load moves block {top} of its block table", hint=_SAME_VERSION)


def check_staged(slots: list[list[int]], asked: list[list[int]], num_slots: int, source: RemoteKV,
                  request_id: str) -> None:
    """A staging answer names, per KV-cache group, one of the prefill's `num_slots` staging slots for each
    block asked for: fewer would READ fewer blocks than the load needs, others memory outside the slots."""
    sent, wanted = [len(group) for group in slots], [len(ids) for ids in asked]
    if sent != wanted:
        raise KVTransferError(f"request {request_id}: {source.where} answered a staging request with slots for "
                              f"{sent} blocks per KV-cache group, {wanted} were asked for", hint=_SAME_VERSION)
    outside = next((s for group in slots for s in group if not 0 <= s < num_slots), None)
    if outside is not None:
        raise KVTransferError(f"request {request_id}: {source.where} answered a staging request with slot {outside}, "
                              f"outside the {num_slots} staging slots of its handshake", hint=_SAME_VERSION)
