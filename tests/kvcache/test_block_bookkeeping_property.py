"""Random admit/step/load/free/reset sequences against the block manager, as the scheduler drives it.

After every operation: the bookkeeping is consistent (`check_integrity`), every block a request reads
through a prefix hit still holds the KV of that very prefix (a shared cached block was never reused
while referenced), and every follower of the KV event stream (subscribed at the start or later, from
its snapshot) replays to exactly the hashes the event group caches, as the proxy applies them
(proxy/kv_events.py: a set, stored adds, removed discards). At the end every block is free again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.kvcache.event_log import KvEventSubscription

BS = 4
NUM_BLOCKS = 10  # small: allocations keep evicting cached blocks
MAX_TOKENS = 40
FAMILIES = [[f * 1000 + t for t in range(MAX_TOKENS)] for f in range(3)]
SENTINEL = (1 << 128) + 1  # not a 128-bit chained hash: marks "everything before this has arrived"
READ_TIMEOUT_S = 30.0  # a loaded 2-core machine; the runs are queued already, this only bounds a bug

OP = st.tuples(
    st.sampled_from(["admit", "admit", "step", "step", "load", "free", "reset", "subscribe"]),
    st.integers(0, 3),  # which request
    st.integers(0, 2),  # its family: requests of one family share a prefix
    st.integers(0, MAX_TOKENS),  # where its tokens leave the family's
    st.integers(1, 12),  # tokens computed (or loaded) in this step
)


@dataclass
class Follower:
    subscriber: KvEventSubscription
    hashes: set[int] = field(default_factory=set)


@dataclass
class Model:
    bm: BlockManager
    tokens: dict[str, list[int]] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=dict)  # positions whose KV the request's blocks hold
    written: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)  # (group, block) -> its prefix

    def write(self, rid: str, start: int, end: int) -> None:
        """The step (or load) wrote positions [start, end) into the request's blocks."""
        tokens, tables = self.tokens[rid], self.bm.block_ids(rid)
        for g, table in enumerate(tables):
            for j in range(start // BS, -(-end // BS)):
                if table[j] >= 0:
                    self.written[(g, table[j])] = tuple(tokens[:min(end, (j + 1) * BS)])

    def check_reads(self, rid: str, start: int) -> None:
        """A step from `start` finds the KV of every position its queries can see (from start - window on)."""
        tokens = self.tokens[rid]
        for g, (window, table) in enumerate(zip(self.bm.sliding_windows, self.bm.block_ids(rid), strict=True)):
            for j in range(0 if window is None else max(0, start - window) // BS, -(-start // BS)):
                upto = min(start, (j + 1) * BS)
                held = self.written.get((g, table[j]), ()) if table[j] >= 0 else ()
                assert held[:upto] == tuple(tokens[:upto]), f"group {g} entry {j} of {rid} misses its KV at {start}"

    def check_hit(self, rid: str, num_tokens: int) -> None:
        tokens = self.tokens[rid]
        for g, table in enumerate(self.bm.block_ids(rid)):
            for j in range(num_tokens // BS):
                if table[j] >= 0:
                    assert self.written.get((g, table[j])) == tuple(tokens[:(j + 1) * BS]), \
                        f"group {g} block {table[j]} (entry {j} of {rid}) holds another prefix's KV"


def _tokens(family: int, diverge: int, who: int) -> list[int]:
    return FAMILIES[family][:diverge] + [50_000 + who * 100 + t for t in range(MAX_TOKENS - diverge)]


def _admit(m: Model, rid: str, tokens: list[int], n: int, remote: bool) -> None:
    """A fresh request: local prefix hit, then compute `n` tokens (or have a connector load them)."""
    bm = m.bm
    hit = bm.match_prefix(tokens, len(tokens) - 1)
    m.tokens[rid] = tokens
    start = hit.num_tokens
    end = min(len(tokens) - 1 if remote else len(tokens), start + n)
    # A load fills sliding-window groups only from where the next step reads (scheduler._consult_connector).
    if not bm.allocate(rid, end, end if remote else start, hit):
        del m.tokens[rid]
        return
    m.check_hit(rid, start)
    m.check_reads(rid, start)
    m.write(rid, start, end)
    bm.cache_blocks(rid, tokens, end)
    m.computed[rid] = end


def _step(m: Model, rid: str, n: int) -> None:
    bm, start = m.bm, m.computed[rid]
    end = min(len(m.tokens[rid]), start + n)
    bm.release_out_of_window(rid, start)
    if not bm.allocate(rid, end, start):
        bm.free(rid)  # preempted: it gives every block back and starts over later
        del m.tokens[rid], m.computed[rid]
        return
    m.check_reads(rid, start)
    m.write(rid, start, end)
    bm.cache_blocks(rid, m.tokens[rid], end)
    m.computed[rid] = end


async def _replay(bm: BlockManager, followers: list[Follower]) -> None:
    bm.events.stored(SENTINEL)
    bm.events.removed(SENTINEL)
    bm.events.flush()
    for follower in followers:
        done = False
        while not done:
            runs = await bm.events.next_runs(follower.subscriber, READ_TIMEOUT_S)
            assert runs, "a follower was dropped or its runs never came"
            for kind, hashes in runs:
                for h in hashes:
                    done = h == SENTINEL and kind == "removed"
                    (follower.hashes.add if kind == "stored" else follower.hashes.discard)(h)
    cached = {node.block_hash for node in bm.pools[bm.event_group].node_block}
    for follower in followers:
        assert follower.hashes == cached


async def _run(windows: list[int | None], ops: list[tuple[str, int, int, int, int]]) -> None:
    m = Model(BlockManager(NUM_BLOCKS, BS, sliding_windows=windows))
    bm, loop = m.bm, asyncio.get_running_loop()
    followers = [Follower(bm.events.subscribe(loop)[0])]
    for op, who, family, diverge, n in ops:
        rid = f"r{who}"
        if op in ("admit", "load") and rid not in m.tokens:
            _admit(m, rid, _tokens(family, diverge, who), n, remote=op == "load")
        elif op == "step" and rid in m.computed and m.computed[rid] < len(m.tokens[rid]):
            _step(m, rid, n)
        elif op == "free" and rid in m.tokens:
            bm.free(rid)
            del m.tokens[rid], m.computed[rid]
        elif op == "reset" and not m.tokens:
            bm.reset_prefix_cache()
        elif op == "subscribe":
            subscriber, snapshot = bm.events.subscribe(loop)
            followers.append(Follower(subscriber, set(snapshot)))
        bm.check_integrity()
        await _replay(bm, followers)
    for rid in list(m.tokens):
        bm.free(rid)
    bm.check_integrity()
    assert bm.num_free_blocks() == NUM_BLOCKS
    assert all(r == 0 for pool in bm.pools for r in pool.ref_cnt)
    await _replay(bm, followers)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([[None], [None, 8], [8], [4, None], [6, None], [None, 5]]),
       st.lists(OP, min_size=10, max_size=60))
def test_random_operations_keep_blocks_cached_kv_and_events_consistent(
        windows: list[int | None], ops: list[tuple[str, int, int, int, int]]) -> None:
    asyncio.run(_run(windows, ops))
