"""Block manager: allocation, ref counts, prefix caching (incl. hash collisions), windows, integrity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlaunch.errors import EngineError
from pdlaunch.kvcache.block_integrity import BlockIntegrityError
from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.kvcache.prefix_cache import hash_block

BS = 4


def run_prompt(bm: BlockManager, rid: str, tokens: list[int], max_hit: int | None = None) -> int:
    """Admit a request the way the scheduler does and mark its prompt computed; returns the hit."""
    hit = bm.match_prefix(tokens, len(tokens) - 1 if max_hit is None else max_hit)
    assert bm.allocate(rid, len(tokens), hit.num_tokens, hit)
    bm.cache_blocks(rid, tokens, len(tokens))
    return hit.num_tokens


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(8, BS)
    assert bm.allocate("a", 10, 0)
    assert [len(t) for t in bm.block_ids("a")] == [3]
    assert bm.num_used_blocks() == 3
    assert bm.allocate("a", 13, 10)  # grows by one block
    assert bm.num_used_blocks() == 4
    bm.check_integrity()
    bm.free("a")
    assert bm.num_free_blocks() == 8
    bm.check_integrity()


def test_allocation_is_all_or_nothing() -> None:
    bm = BlockManager(4, BS)
    assert bm.allocate("a", 12, 0)
    assert not bm.allocate("b", 8, 0)
    assert not bm.has_blocks("b")
    assert bm.num_used_blocks() == 3
    bm.check_integrity()


def test_zero_blocks_is_a_clear_error() -> None:
    with pytest.raises(EngineError, match="num_gpu_blocks"):
        BlockManager(0, BS)


def test_prefix_hit_shares_blocks_and_keeps_last_token_uncached() -> None:
    bm = BlockManager(16, BS)
    prompt = list(range(100, 114))  # 14 tokens: 3 full blocks
    assert run_prompt(bm, "a", prompt) == 0
    # Same prompt: 3 full blocks cached, the hit may cover at most 13 tokens -> 12.
    assert run_prompt(bm, "b", prompt) == 12
    assert bm.block_ids("a")[0][:3] == bm.block_ids("b")[0][:3]
    assert bm.block_ids("a")[0][3] != bm.block_ids("b")[0][3]
    bm.check_integrity()
    # A 12-token prompt that is exactly cached still recomputes its last block.
    assert run_prompt(bm, "c", prompt[:12]) == 8
    # A diverging prompt hits only the common full blocks.
    assert run_prompt(bm, "d", prompt[:6] + [1, 2, 3, 4, 5, 6, 7]) == 4
    bm.check_integrity()
    for rid in "abcd":
        bm.free(rid)
    bm.check_integrity()
    assert bm.num_free_blocks() == 16
    # Freed cached blocks stay findable.
    assert bm.match_prefix(prompt, 13).num_tokens == 12


def test_hash_collisions_never_give_a_false_hit() -> None:
    bm = BlockManager(16, BS, hash_fn=lambda parent, tokens: 7)  # every block collides
    run_prompt(bm, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.match_prefix([9, 9, 9, 9, 5, 6, 7, 8, 9], 8).num_tokens == 0
    assert bm.match_prefix([1, 2, 3, 4, 9, 9, 9, 9, 9], 8).num_tokens == 4
    assert bm.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9], 8).num_tokens == 8
    # Same second block after a different first block: a different prefix, never a hit.
    assert run_prompt(bm, "b", [9, 9, 9, 9, 5, 6, 7, 8, 0]) == 0
    bm.check_integrity()
    assert len(bm.index.buckets[7]) == 4  # four different prefixes under one hash
    assert bm.block_ids("a")[0][1] != bm.block_ids("b")[0][1]
    assert bm.match_prefix([9, 9, 9, 9, 5, 6, 7, 8, 1], 8).num_tokens == 8
    assert bm.match_prefix([9, 9, 9, 9, 5, 6, 7, 8, 1], 8).block_ids == [bm.block_ids("b")[0][:2]]


def test_chained_hash_depends_on_parent() -> None:
    assert hash_block(None, (1, 2)) != hash_block(hash_block(None, (0, 0)), (1, 2))
    assert hash_block(None, (1, 2)) == hash_block(None, (1, 2))


def test_uncached_blocks_are_reused_before_cached_ones_and_eviction_uncaches() -> None:
    bm = BlockManager(4, BS)
    run_prompt(bm, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])  # blocks: 2 cached + 1 partial
    cached = set(bm.block_ids("a")[0][:2])
    bm.free("a")
    assert bm.allocate("b", 8, 0)  # 2 blocks: the untouched one and the uncached partial one
    assert not cached & set(bm.block_ids("b")[0])
    assert bm.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9], 8).num_tokens == 8
    assert bm.allocate("c", 4, 0)  # evicts the least recently freed cached block: the tail (freed first)
    assert bm.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9], 8).num_tokens == 4
    bm.check_integrity()


def test_hit_on_free_cached_blocks_counts_against_the_free_list() -> None:
    bm = BlockManager(3, BS)
    run_prompt(bm, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.free("a")
    hit = bm.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], 12)
    assert hit.num_tokens == 8
    assert not bm.allocate("b", 17, 8, hit)  # needs 2 revived + 3 new > 3 free
    assert bm.num_free_blocks() == 3
    assert bm.allocate("b", 12, 8, hit)
    bm.check_integrity()


def test_sliding_window_releases_blocks_and_prefix_matches_the_window() -> None:
    bm = BlockManager(32, BS, sliding_windows=[None, 8])
    tokens = list(range(40))
    assert bm.allocate("a", 40, 0)
    bm.cache_blocks("a", tokens, 40)
    bm.release_out_of_window("a", 40)
    full, sliding = bm.block_ids("a")
    assert -1 not in full
    # Query at 40 sees keys from 33 on; blocks ending before 32 go: indices 0..7 -> -1.
    assert sliding[:8] == [-1] * 8 and -1 not in sliding[8:]
    bm.check_integrity()
    assert bm.num_free_blocks() == 32 - 10
    bm.free("a")
    # Every block stays cached; a 40-token hit takes only blocks 8..9 in the sliding group.
    hit = bm.match_prefix(tokens + [99], 40)
    assert hit.num_tokens == 40
    assert hit.block_ids[1][:8] == [-1] * 8 and -1 not in hit.block_ids[1][8:]
    bm.check_integrity()


def test_prefix_hit_in_sliding_only_model_needs_only_the_window() -> None:
    bm = BlockManager(8, BS, sliding_windows=[4])
    tokens = list(range(24))
    for start in range(0, 24, 4):  # one chunk per step, releasing as it goes: holds at most 3 blocks
        assert bm.allocate("a", start + 4, start)
        bm.cache_blocks("a", tokens, start + 4)
        bm.release_out_of_window("a", start + 4)
    bm.free("a")
    assert run_prompt(bm, "b", tokens + [1]) == 24
    assert bm.block_ids("b")[0][:5] == [-1] * 5
    bm.check_integrity()


def test_integrity_check_catches_corruption() -> None:
    bm = BlockManager(8, BS)
    run_prompt(bm, "a", list(range(9)))
    bm.check_integrity()
    bm.pools[0].ref_cnt[bm.block_ids("a")[0][0]] += 1
    with pytest.raises(BlockIntegrityError, match="owners"):
        bm.check_integrity()
    bm.pools[0].ref_cnt[bm.block_ids("a")[0][0]] -= 1
    bm.pools[0].free[bm.block_ids("a")[0][1]] = None
    with pytest.raises(BlockIntegrityError, match="free"):
        bm.check_integrity()
    del bm.pools[0].free[bm.block_ids("a")[0][1]]
    bm.tables["a"][0].append(bm.tables["a"][0][0])
    with pytest.raises(BlockIntegrityError, match="twice"):
        bm.check_integrity()
    bm.tables["a"][0].pop()
    bm.index.buckets[12345] = [bm.chains["a"][0]]
    with pytest.raises(BlockIntegrityError, match="bucket"):
        bm.check_integrity()
    del bm.index.buckets[12345]
    bm.chains["a"][0].refs += 1
    with pytest.raises(BlockIntegrityError, match="references"):
        bm.check_integrity()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 5), st.integers(1, 12)),
                max_size=40))
def test_random_operations_keep_integrity_and_return_every_block(ops: list[tuple[str, int, int]]) -> None:
    bm = BlockManager(12, BS, sliding_windows=[None, 6])
    lengths: dict[str, int] = {}
    for op, who, n in ops:
        rid = f"r{who}"
        tokens = [who % 2] * 64  # two families of identical prefixes
        if op == "add" and rid not in lengths:
            hit = bm.match_prefix(tokens[:n], n - 1)
            if bm.allocate(rid, n, hit.num_tokens, hit):
                bm.cache_blocks(rid, tokens, n)
                lengths[rid] = n
        elif op == "grow" and rid in lengths:
            new = min(64, lengths[rid] + n)
            bm.release_out_of_window(rid, lengths[rid])
            if bm.allocate(rid, new, lengths[rid]):
                bm.cache_blocks(rid, tokens, new)
                lengths[rid] = new
        elif op == "free":
            bm.free(rid)
            lengths.pop(rid, None)
        bm.check_integrity()
    for rid in list(lengths):
        bm.free(rid)
    bm.check_integrity()
    assert bm.num_free_blocks() == 12


def test_reset_prefix_cache_forgets_everything_and_refuses_while_busy() -> None:
    bm = BlockManager(16, BS, sliding_windows=[None, 8])
    run_prompt(bm, "a", list(range(20)))
    with pytest.raises(BlockIntegrityError, match="hold blocks"):
        bm.reset_prefix_cache()
    bm.free("a")
    bm.reset_prefix_cache()
    assert bm.index.buckets == {} and bm.match_prefix(list(range(20)), 19).num_tokens == 0
    bm.check_integrity()
    assert bm.num_free_blocks() == 16
