"""KV cache events: what an instance tells the proxy about the full blocks it caches.

An instance streams these as newline-delimited JSON from `GET /v1/kv_events`: first one `snapshot`
(the cached blocks' chained hashes; a large cache's rest follows as `stored` events), then a `stored` or
`removed` event each time blocks enter or leave its prefix cache. Blocks are named by
`prefix_cache.hash_block` chained from the prompt's first token, written as 32 hex digits, so the proxy
can hash a prompt's token ids itself (`prompt_block_hashes`) and count how many leading blocks an instance
already holds. An empty line is a heartbeat: an instance sends one after HEARTBEAT_S seconds without an event, so a
reader that hears nothing for several of them knows the stream is dead (a half-open connection, a
stopped process) rather than merely quiet.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

HEARTBEAT_S = 5.0  # an idle stream sends an empty line this often

BlockHashHex = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=0, description="Position in this stream; the snapshot is 0, each later event one more.")


class KvSnapshot(_Event):
    type: Literal["snapshot"] = "snapshot"
    engine_id: str
    block_size: int = Field(gt=0)
    hashes: list[BlockHashHex]
    num_blocks: int | None = Field(None, gt=0, description="Blocks of the pool the events describe: it never "
                                   "caches more hashes than this (absent from older instances).")


class KvStored(_Event):
    type: Literal["stored"] = "stored"
    hashes: list[BlockHashHex]


class KvRemoved(_Event):
    type: Literal["removed"] = "removed"
    hashes: list[BlockHashHex]


KvEvent = Annotated[KvSnapshot | KvStored | KvRemoved, Field(discriminator="type")]
KV_EVENT = TypeAdapter(KvEvent)


def hash_hex(block_hash: int) -> str:
    """The wire form of a chained block hash: 32 lowercase hex digits."""
    return f"{block_hash:032x}"


def prompt_block_hashes(token_ids: list[int], block_size: int) -> list[str]:
    """Chained hashes of the prompt's full blocks, in order, as the instances name them (PromptBlockHashes)."""
    return PromptBlockHashes(token_ids, block_size).all()


class PromptBlockHashes:
    """A prompt's chained block hashes as the instances name them (hash_block's), computed only as far as they are
    read: a match stops at its first miss, so a long prompt that an instance caches the start of costs the proxy's
    event loop the hashes of that start, not one per block of the prompt (~0.1 s for 128K tokens). The ids are packed
    PACK_BLOCKS blocks at a time rather than per block (half the time of a block-by-block hash_block)."""

    PACK_BLOCKS = 64

    def __init__(self, token_ids: list[int], block_size: int) -> None:
        self._ids, self._block_size = token_ids, block_size
        self.num_blocks = len(token_ids) // block_size
        self._hashes: list[str] = []
        self._head = b"\x00"

    def matched(self, cached: set[str] | frozenset[str]) -> int:
        """How many leading blocks are in `cached` (a chain stops at its first miss)."""
        count = 0
        while count < self.num_blocks:
            if count == len(self._hashes):
                self._extend()
            if self._hashes[count] not in cached:
                return count
            count += 1
        return count

    def all(self) -> list[str]:
        while len(self._hashes) < self.num_blocks:
            self._extend()
        return list(self._hashes)

    def _extend(self) -> None:
        """Hash the next PACK_BLOCKS blocks (or those left)."""
        first, size = len(self._hashes), self._block_size
        last = min(first + self.PACK_BLOCKS, self.num_blocks)
        packed = array("q", self._ids[first * size : last * size]).tobytes()
        step, head = 8 * size, self._head
        for start in range(0, len(packed), step):
            digest = hashlib.blake2b(head, digest_size=16)
            digest.update(packed[start : start + step])
            block = digest.digest()
            head = b"\x01" + block  # the parent hash, as hash_block writes it: 16 little-endian bytes
            self._hashes.append(block[::-1].hex())  # hash_hex of the little-endian integer
        self._head = head


def matched_blocks(prompt_hashes: list[str], cached: set[str] | frozenset[str]) -> int:
    """How many leading blocks of the prompt are in `cached` (a chain stops at its first miss)."""
    for count, block_hash in enumerate(prompt_hashes):
        if block_hash not in cached:
            return count
    return len(prompt_hashes)
