"""Prefix identity of full KV blocks: chained block hashes, verified exactly.

Block j of a token sequence has the chained hash h_j = H(h_{j-1}, tokens of block j) (128-bit
blake2b; stable across processes, so connectors and offloaders can name blocks by it). The hash
only picks a bucket: a lookup also compares the block's token ids and the *identity* of its parent
node, so two prefixes are equal only when every token is, whatever the hash function does.

A node lives while something refers to it: a cached block (in any KV-cache group), a child node,
or a request whose token chain runs through it. Keeping parents alive is what lets a
sliding-window group, which no longer caches a prefix's first blocks, still be reached by walking
the chain from the root.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable

HashFn = Callable[[int | None, tuple[int, ...]], int]


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """128-bit chained hash of one full block (blake2b over the parent hash and the token ids)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"\x00" if parent_hash is None else b"\x01" + parent_hash.to_bytes(16, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


class PrefixNode:
    """One full block's worth of a token prefix. Compared by identity, never by value."""

    __slots__ = ("block_hash", "parent", "token_ids", "refs")

    def __init__(self, block_hash: int, parent: PrefixNode | None, token_ids: tuple[int, ...]) -> None:
        self.block_hash = block_hash
        self.parent = parent
        self.token_ids = token_ids
        self.refs = 0  # cached blocks + child nodes + request chains referring to this node


class PrefixIndex:
    """All live prefix nodes, bucketed by chained hash."""

    def __init__(self, hash_fn: HashFn = hash_block) -> None:
        self.hash_fn = hash_fn
        self.buckets: dict[int, list[PrefixNode]] = {}

    def find(self, parent: PrefixNode | None, token_ids: tuple[int, ...]) -> PrefixNode | None:
        block_hash = self.hash_fn(parent.block_hash if parent else None, token_ids)
        for node in self.buckets.get(block_hash, ()):
            if node.parent is parent and node.token_ids == token_ids:
                return node
        return None

    def find_chain(self, token_ids: list[int], block_size: int, num_blocks: int) -> list[PrefixNode]:
        """Nodes of the longest indexed prefix of the first `num_blocks` blocks of `token_ids`."""
        chain: list[PrefixNode] = []
        parent = None
        for j in range(num_blocks):
            node = self.find(parent, tuple(token_ids[j * block_size:(j + 1) * block_size]))
            if node is None:
                break
            chain.append(node)
            parent = node
        return chain

    def get_or_add(self, parent: PrefixNode | None, token_ids: tuple[int, ...]) -> PrefixNode:
        """The node for (parent, token_ids), created if new. The caller takes a reference."""
        node = self.find(parent, token_ids)
        if node is None:
            node = PrefixNode(self.hash_fn(parent.block_hash if parent else None, token_ids), parent, token_ids)
            self.buckets.setdefault(node.block_hash, []).append(node)
            if parent is not None:
                parent.refs += 1
        node.refs += 1
        return node

    def ref(self, node: PrefixNode) -> None:
        node.refs += 1

    def unref(self, node: PrefixNode) -> None:
        """Drop one reference; a node nobody refers to leaves the index, then its parent is unref'd."""
        current: PrefixNode | None = node
        while current is not None:
            current.refs -= 1
            if current.refs > 0:
                return
            bucket = self.buckets[current.block_hash]
            bucket.remove(current)
            if not bucket:
                del self.buckets[current.block_hash]
            current = current.parent

    def nodes(self) -> list[PrefixNode]:
        return [n for bucket in self.buckets.values() for n in bucket]
